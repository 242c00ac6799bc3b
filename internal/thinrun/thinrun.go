// Package thinrun is the command line of granary-run, the light job
// launcher: `granary-run [flags] ID -- CMD [ARGS...]` does what
// `granary run` does, with the same flags, environment, defaults,
// messages and exit codes, but links only the standard library and the
// light project packages (paths, agent, jobrun, core), so that the
// process starts in a few milliseconds instead of the ~50 ms the full
// binary spends initialising etcd, gRPC, protobuf and the rest.
//
// It does the job itself only on the fast path: a local node serves the
// state directory with the same shared root and prefix, and the package
// is available. Everything else is handed, with the same arguments, to
// the full binary (`granary run ...`, found next to this executable, else
// in $PATH) by exec, so nothing of granary-run stays behind:
//
//   - $GRANARY_AGENT=off, or no node serves the state directory (the full
//     binary starts the embedded node, or uses a store of its own);
//   - the node serves another root or prefix;
//   - a flag other than --root, --state-dir and --prefix, -h, no "--"
//     before the command, or an invalid ID (the full binary reports
//     usage errors and prints help);
//   - the reference waits for a build in progress (the full binary shows
//     the waiting line), or the node answers IncRef with an error other
//     than "does not exist".
//
// A package that does not exist is reported here, with the full binary's
// message and exit code 3. While the command runs, granary-run behaves as
// `granary run` through the node (jobrun.Job.Run); the one difference is
// that when the node goes away it waits for a node to come back but does
// not start the embedded node itself (the next full `granary` command
// does; a node run as a service is restarted by its supervisor).
package thinrun

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"syscall"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/internal/paths"
)

// FullBinary is the file name of the full command line.
const FullBinary = "granary"

// config is what the fast path needs of a command line.
type config struct {
	root, stateDir, prefix string
	id                     string
	argv                   []string
}

// fallback is the reason the job goes to the full binary.
type fallback struct{ why string }

func (f *fallback) Error() string { return f.why }

// parse resolves the configuration as the full CLI does (paths' defaults,
// GRANARY_* environment, flags), or says why only the full binary can.
func parse(args []string, getenv func(string) string) (config, error) {
	c := config{root: paths.DefaultRoot(), stateDir: paths.DefaultStateDir(), prefix: paths.DefaultPrefix}
	dash := -1
	for i, a := range args {
		if a == "--" {
			dash = i
			break
		}
	}
	if dash < 0 || dash == len(args)-1 {
		return c, &fallback{"no command after \"--\""}
	}
	c.argv = args[dash+1:]
	pl := paths.Places{Root: &c.root, StateDir: &c.stateDir, Prefix: &c.prefix}
	pl.FromEnv(getenv)
	fs := flag.NewFlagSet("granary-run", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	pl.RegisterFlags(fs)
	var pos []string
	for before := args[:dash]; ; {
		if err := fs.Parse(before); err != nil {
			return c, &fallback{err.Error()}
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		before = fs.Args()[1:]
	}
	if len(pos) != 1 || core.ValidateID(pos[0]) != nil {
		return c, &fallback{"not exactly one valid package ID"}
	}
	c.id = pos[0]
	if getenv(jobrun.EnvAgent) == "off" {
		return c, &fallback{"$" + jobrun.EnvAgent + "=off"}
	}
	if c.root == "" || !filepath.IsAbs(c.stateDir) {
		return c, &fallback{"no shared root or no absolute state directory"}
	}
	c.root, _ = filepath.Abs(c.root)
	return c, nil
}

// hold connects to the node of c and takes the reference to c.id. With
// noWait, it gives up (ErrWaiting) as soon as the node reports that the
// reference waits for a build.
func hold(ctx context.Context, c config, noWait bool) (*agent.Conn, error) {
	cl, incref, err := agent.ConnectHold(ctx, c.stateDir, agent.Options{Purpose: "granary run " + c.argv[0]}, c.id, noWait)
	if err != nil {
		return nil, &fallback{"no local node serves " + c.stateDir}
	}
	if h := cl.Hello(); h.Root != c.root || h.Prefix != c.prefix {
		cl.Close()
		return nil, &fallback{fmt.Sprintf("the local node serves root %s prefix %s", h.Root, h.Prefix)}
	}
	if incref != nil {
		cl.Close()
		return nil, incref
	}
	return cl, nil
}

// Main runs granary-run with args (without the program name). It returns
// like cli.Run (map the error with jobrun's ExitErr: a nil Err was printed
// already); when the full binary must do the job it does not return: it
// execs that binary, and returns an error only if there is none.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version") {
		fmt.Fprintln(stdout, version())
		return nil
	}
	c, err := parse(args, os.Getenv)
	var fb *fallback
	if err == nil {
		var cl *agent.Conn
		cl, err = hold(ctx, c, true)
		switch {
		case err == nil:
			j := &jobrun.Job{
				ID: c.id, Argv: c.argv, Pkg: cl.Handle(c.id).OutputDirectory(),
				Stdin: stdin, Stdout: stdout, Stderr: stderr,
				Hold: func(ctx context.Context) (jobrun.Ref, error) {
					r, err := hold(ctx, c, false)
					if err != nil {
						return nil, err // a *fallback: retried until a node serves c
					}
					return r, nil
				},
			}
			return j.Run(ctx, cl)
		case errors.Is(err, core.ErrPackageNotExist):
			return jobrun.NotAvailable(c.id, err)
		case errors.As(err, &fb):
		default:
			fb = &fallback{err.Error()}
		}
	} else if !errors.As(err, &fb) {
		return err
	}
	return execFull(args, fb.why)
}

// Exit prints err's message to stderr, if it has one, and returns the exit
// code for it: 0 for nil, an ExitErr's code, 1 otherwise.
func Exit(err error, stderr io.Writer) int {
	if err == nil {
		return jobrun.ExitOK
	}
	var ee *jobrun.ExitErr
	if !errors.As(err, &ee) {
		fmt.Fprintln(stderr, err)
		return jobrun.ExitError
	}
	if ee.Err != nil {
		fmt.Fprintln(stderr, ee.Err)
	}
	return ee.Code
}

// execFull replaces this process with the full binary's `run` and args.
func execFull(args []string, why string) error {
	path, err := FindFull()
	if err != nil {
		return &jobrun.ExitErr{Code: jobrun.ExitError, Err: fmt.Errorf("granary-run: cannot do this job itself (%s) and %v", why, err)}
	}
	argv := append([]string{FullBinary, "run"}, args...)
	err = syscall.Exec(path, argv, os.Environ())
	return &jobrun.ExitErr{Code: jobrun.ExitError, Err: fmt.Errorf("granary-run: exec %s: %w", path, err)}
}

// ErrNoFull is returned by FindFull when there is no full binary.
var ErrNoFull = errors.New("the full granary binary was not found")

// FindFull returns the full binary: the file named granary next to this
// executable, else granary in $PATH.
func FindFull() (string, error) {
	exe, err := os.Executable()
	if err == nil {
		p := filepath.Join(filepath.Dir(exe), FullBinary)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := exec.LookPath(FullBinary); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%w next to %s nor in $PATH: install it there", ErrNoFull, exe)
}

// version describes this binary: its module version and Go version.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "granary-run (no build information)"
	}
	return fmt.Sprintf("granary-run %s, %s", bi.Main.Version, bi.GoVersion)
}
