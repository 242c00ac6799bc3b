package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/node"
)

// EnvSizes selects the sizes ("tiny" for tests) without a visible flag.
const EnvSizes = "GRANARY_BENCH_SIZES"

const topUsage = `granary-bench: Granary's benchmarks and farm simulation

usage:
  granary-bench [flags]        measure the store against raw etcd (--quick, --only, --json FILE, --chart FILE)
  granary-bench farm [flags]   simulate H hosts × a job rate per host on a private 3-member embedded etcd

With no --endpoints (or $GRANARY_ENDPOINTS), the scenarios run on a private
embedded etcd of their own, never the local node's. The host agent scenario
times warm 'granary run' and 'granary-run' jobs with the binaries of those
names next to this program, else in $PATH (--granary, --granary-run).
Exit codes: 0 ok, 1 error, 2 usage.
`

// Run runs the granary-bench command line args (without the program name).
// It blocks until the run is done or ctx ends.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	e := &env{stdout: stdout, stderr: stderr, getenv: os.Getenv}
	if len(args) > 0 {
		switch args[0] {
		case "help":
			fmt.Fprint(stdout, topUsage)
			return nil
		case "farm":
			return cmdFarm(ctx, e, args[1:])
		case "child":
			// The child process of the memory scenarios (not in the usage).
			return cmdChild(ctx, e, args[1:])
		}
	}
	return cmdBench(ctx, e, args)
}

// env is one invocation's I/O.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
}

// flags is a command's flag set, with the connection flags bound to cfg
// if the command connects to etcd.
type flags struct {
	*flag.FlagSet
	cmd string // "granary-bench", "granary-bench farm", …
	cfg node.Config
}

// newFlags returns the flag set of cmd; conn adds the connection flags
// (and reads their environment variables).
func (e *env) newFlags(cmd string, conn bool) (*flags, error) {
	f := &flags{FlagSet: flag.NewFlagSet(cmd, flag.ContinueOnError), cmd: cmd}
	f.SetOutput(io.Discard)
	if !conn {
		return f, nil
	}
	f.cfg = node.DefaultConfig()
	if err := f.cfg.FromEnv(e.getenv); err != nil {
		return nil, &jobrun.ExitErr{Code: jobrun.ExitUsage, Err: fmt.Errorf("%s: %w", cmd, err)}
	}
	f.cfg.RegisterFlags(f.FlagSet)
	return f, nil
}

// parseNoArgs parses args, which must be flags only. -h prints the usage
// and the flags to stdout.
func (e *env) parseNoArgs(f *flags, args []string) error {
	err := f.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(e.stdout, topUsage)
		fmt.Fprintf(e.stdout, "\nflags of %s:\n", f.cmd)
		f.SetOutput(e.stdout)
		f.PrintDefaults()
		return &jobrun.ExitErr{Code: jobrun.ExitOK}
	}
	if err == nil && f.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", f.Arg(0))
	}
	if err != nil {
		return f.usageErr("%v", err)
	}
	return nil
}

// usageErr is a command-line error of f's command.
func (f *flags) usageErr(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	return &jobrun.ExitErr{Code: jobrun.ExitUsage, Err: fmt.Errorf("%s: %s\nusage: %s [flags] (run '%s -h' for them)", f.cmd, msg, f.cmd, f.cmd)}
}

// exitCode prints err's message, if any, to stderr and returns the exit
// code: 0 for nil, an ExitErr's own code (2 for usage errors), 1 otherwise.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return jobrun.ExitOK
	}
	code := jobrun.ExitError
	if ee := (*jobrun.ExitErr)(nil); errors.As(err, &ee) {
		code = ee.Code
		if ee.Err == nil {
			return code
		}
	}
	msg := err.Error()
	if !strings.HasPrefix(msg, "granary-bench") {
		msg = "granary-bench: " + msg
	}
	fmt.Fprintln(stderr, msg)
	return code
}
