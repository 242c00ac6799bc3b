package main

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"
	"go.etcd.io/etcd/client/pkg/v3/testutil"

	"github.com/granary-build/granary/internal/cli"
	"github.com/granary-build/granary/internal/reaper"
	"github.com/granary-build/granary/internal/thinrun"
)

// TestMain registers granary-bench and the two programs whose jobs its
// agent scenario times, granary and granary-run, so that scripts run the
// real mains in child processes; it checks for leaked goroutines in the
// test process.
func TestMain(m *testing.M) {
	reaper.Main() // builders run under a guard that re-executes this binary
	testscript.Main(leakChecked{m}, map[string]func(){"granary-bench": main, "granary": granary, "granary-run": granaryRun})
}

// granary is the main of cmd/granary (a package main of its own).
func granary() {
	err := cli.Run(context.Background(), os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	if msg := cli.Message(err); msg != "" {
		fmt.Fprintln(os.Stderr, msg)
	}
	os.Exit(cli.ExitCode(err))
}

// granaryRun is the main of cmd/granary-run.
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
			// No configuration and no endpoints: a private embedded etcd.
			env.Setenv("HOME", env.WorkDir+"/home")
			env.Setenv("XDG_DATA_HOME", "")
			env.Setenv("XDG_STATE_HOME", "")
			env.Setenv("GRANARY_ENDPOINTS", "")
			env.Setenv("GRANARY_HOST", "")
			return nil
		},
	})
}
