package main

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rogpeppe/go-internal/testscript"
	"go.etcd.io/etcd/client/pkg/v3/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/internal/reaper"
	"github.com/granary-build/granary/internal/thinrun"
	"github.com/granary-build/granary/node"
)

// TestMain registers the granary command, so scripts run the real main in
// a child process (and the auto-started node re-executes it), and checks for
// leaked goroutines in the test process (the in-process etcd servers).
func TestMain(m *testing.M) {
	reaper.Main() // builders run under a guard that re-executes this binary
	testscript.Main(leakChecked{m}, map[string]func(){"granary": main, "granary-run": granaryRun})
}

// granaryRun is the main of cmd/granary-run (a package main of its own).
func granaryRun() {
	err := thinrun.Main(context.Background(), os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	os.Exit(thinrun.Exit(err, os.Stderr))
}

type leakChecked struct{ m *testing.M }

func (l leakChecked) Run() int {
	code := l.m.Run()
	if code == 0 && testutil.CheckLeakedGoroutine() {
		return 1
	}
	return code
}

func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(env *testscript.Env) error {
			// An empty home: no configuration, no node, no endpoints.
			home := filepath.Join(env.WorkDir, "home")
			env.Setenv("HOME", home)
			env.Setenv("XDG_DATA_HOME", "")
			env.Setenv("XDG_STATE_HOME", "")
			env.Setenv("GRANARY_ENDPOINTS", "")
			env.Setenv("GRANARY_HOST", "")
			// A node a failed script leaves behind stops by itself.
			env.Setenv("GRANARY_IDLE_TIMEOUT", "1m")
			env.Defer(func() { stopLeftoverNode(filepath.Join(home, ".local", "state", "granary")) })
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"etcd":     cmdEtcd,
			"exitcode": cmdExitcode,
			"waitfile": cmdWaitfile,
			"waitgrep": cmdWaitgrep,
			"ptyrun":   cmdPtyrun,
			"nowrap":   cmdNowrap,
			"steal":    cmdSteal,
			"pidgone":  cmdPidgone,
		},
	})
}

// etcd [VAR] starts an embedded etcd in the test process for the rest of
// the script and sets $VAR (default ETCD) to its endpoint.
func cmdEtcd(ts *testscript.TestScript, neg bool, args []string) {
	name := "ETCD"
	if len(args) > 0 {
		name = args[0]
	}
	srv, err := etcdtest.StartServer()
	ts.Check(err)
	ts.Defer(srv.Close)
	ts.Setenv(name, srv.Endpoint)
}

// exitcode N PROG ARGS... runs PROG and requires exit status N; stdout and
// stderr are kept for the next commands, as exec's are.
func cmdExitcode(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) < 2 {
		ts.Fatalf("usage: exitcode N PROG [ARGS...]")
	}
	want, err := strconv.Atoi(args[0])
	ts.Check(err)
	err = ts.Exec(args[1], args[2:]...)
	got := 0
	var xe *exec.ExitError
	switch {
	case errors.As(err, &xe):
		got = xe.ExitCode()
	case err != nil:
		ts.Fatalf("%s: %v", args[1], err)
	}
	if got != want {
		ts.Fatalf("%s exited with %d, want %d", args[1], got, want)
	}
}

// waitfile FILE waits, at most 60 s, until FILE exists: a background
// command creates it to say it reached a point (for example, holds its
// reference). Another process's progress cannot be watched from the script,
// so this is a bounded poll of the file system, in one place.
func cmdWaitfile(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: waitfile FILE")
	}
	err := ts.Exec("sh", "-c", `i=0; while [ ! -e "$1" ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 1; sleep 0.05; done`, "sh", ts.MkAbs(args[0]))
	if err != nil {
		ts.Fatalf("%s did not appear within 60s", args[0])
	}
}

// pidgone FILE waits, at most 10 s, until the process whose pid FILE holds
// no longer runs (a zombie counts as gone); with !, checks that it runs,
// and kills it afterwards at the end of the script.
func cmdPidgone(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: [!] pidgone FILE")
	}
	pid, err := strconv.Atoi(strings.TrimSpace(ts.ReadFile(args[0])))
	ts.Check(err)
	running := func() bool {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return false
		}
		i := strings.LastIndexByte(string(b), ')')
		return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
	}
	if neg {
		ts.Defer(func() { syscall.Kill(pid, syscall.SIGKILL) })
		if !running() {
			ts.Fatalf("process %d is not running", pid)
		}
		return
	}
	for range 500 {
		if !running() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	ts.Fatalf("process %d still runs after 10s", pid)
}

// waitgrep FILE PATTERN waits, at most 60 s, until FILE has a line that
// matches the extended regular expression PATTERN: a background command
// writing to FILE got that far (the same bounded poll as waitfile).
func cmdWaitgrep(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 2 {
		ts.Fatalf("usage: waitgrep FILE PATTERN")
	}
	err := ts.Exec("sh", "-c", `i=0; until grep -Eq -e "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt 1200 ] && exit 1; sleep 0.05; done`, "sh", ts.MkAbs(args[0]), args[1])
	if err != nil {
		ts.Fatalf("no line matching %q in %s within 60s", args[1], args[0])
	}
}

// steal ID makes the holders of package ID lose it: it revokes the lease of
// every reference to ID and removes the package before the holders notice
// (they learn of a revoked lease only at their next keep-alive, TTL/3
// later). If a holder was quicker and took its reference again, it tries
// again, at most 20 times.
func cmdSteal(ts *testscript.TestScript, neg bool, args []string) {
	if neg || len(args) != 1 {
		ts.Fatalf("usage: steal ID")
	}
	ctx := context.Background()
	cli, err := clientv3.New(etcdtest.ClientConfig(ts.Getenv("ETCD")))
	ts.Check(err)
	defer cli.Close()
	s, err := etcdstore.New(ctx, cli, ts.Getenv("GRANARY_ROOT"), etcdstore.WithHost("thief"))
	ts.Check(err)
	defer s.Close()
	for range 20 {
		info, err := s.Inspect(ctx, args[0])
		ts.Check(err)
		for _, r := range info.Refs {
			id, err := strconv.ParseInt(r.Lease, 16, 64)
			ts.Check(err)
			cli.Revoke(ctx, clientv3.LeaseID(id)) //nolint:errcheck // may be gone already
		}
		ok, err := s.Handle(args[0]).TryRemoveContext(ctx)
		ts.Check(err)
		if ok {
			return
		}
	}
	ts.Fatalf("could not remove %s from under its holders", args[0])
}

// stopLeftoverNode ends a local node a failed script did not stop.
func stopLeftoverNode(stateDir string) {
	l, err := node.ReadLocal(stateDir)
	if err != nil {
		return
	}
	syscall.Kill(l.PID, syscall.SIGTERM)
	os.Remove(filepath.Join(stateDir, "node.json"))
}
