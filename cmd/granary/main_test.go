package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
	"go.etcd.io/etcd/client/pkg/v3/testutil"

	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// TestMain registers the granary command, so scripts run the real main in
// a child process (and the auto-started node re-executes it), and checks for
// leaked goroutines in the test process (the in-process etcd servers).
func TestMain(m *testing.M) {
	testscript.Main(leakChecked{m}, map[string]func(){"granary": main})
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

// waitfile FILE waits until FILE exists (a background command's signal
// that it reached a point), watching with inotify-free polling of the
// directory is avoided: the background process creates the file before it
// blocks, and we wait on the process tree's progress with a bounded loop.
func cmdWaitfile(ts *testscript.TestScript, neg bool, args []string) {
	if len(args) != 1 {
		ts.Fatalf("usage: waitfile FILE")
	}
	path := ts.MkAbs(args[0])
	// The script cannot block on another process otherwise; sh's own
	// polling keeps this in one place and bounded.
	err := ts.Exec("sh", "-c", `i=0; while [ ! -e "$1" ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 1; sleep 0.05; done`, "sh", path)
	if err != nil {
		ts.Fatalf("%s did not appear within 60s", args[0])
	}
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
