// Package jobrun runs a job's command while it holds a reference to a
// package through the local node: what `granary run` does through the
// host agent, shared by the full CLI (internal/cli) and
// the light launcher cmd/granary-run , both over agent.Conn. It owns the
// command's process: signals are forwarded to it, its exit code passed on,
// and it is stopped, with a reason, when its reference is lost. It imports
// only the standard library and the light project packages.
package jobrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
)

// EnvPkg is set, for the command of `run`, to the package's contents
// directory.
const EnvPkg = "GRANARY_PKG"

// EnvAgent set to "off" makes `granary build` and `granary run` use a store
// of their own (their own etcd client and lease) even when a local node
// serves their configuration; granary-run then hands the job to the full
// binary.
const EnvAgent = "GRANARY_AGENT"

// Forwarded are the signals `run` passes on to its command.
var Forwarded = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH}

// ChildExit passes on a child's exit: nil, an ExitErr with its code or
// 128+signal, or err itself if it is not an exit.
func ChildExit(err error) error {
	if err == nil {
		return nil
	}
	var xe *exec.ExitError
	if !errors.As(err, &xe) {
		return err
	}
	code, _ := ExitStatus(xe)
	return &ExitErr{Code: code}
}

// ExitStatus returns the exit code to pass on for a child's exit (its
// status, at least 1, or 128+N for signal N) and words for it.
func ExitStatus(xe *exec.ExitError) (int, string) {
	if ws, ok := xe.Sys().(syscall.WaitStatus); ok {
		return waitStatus(ws)
	}
	return max(xe.ExitCode(), 1), fmt.Sprintf("exited with status %d", xe.ExitCode())
}

func waitStatus(ws syscall.WaitStatus) (int, string) {
	if ws.Signaled() {
		return 128 + int(ws.Signal()), fmt.Sprintf("was killed by signal %d (%v)", int(ws.Signal()), ws.Signal())
	}
	return max(ws.ExitStatus(), 1), fmt.Sprintf("exited with status %d", ws.ExitStatus())
}

// ReconnectWithin bounds how long a job tries to reach a restarted local
// node before it stops its command.
const ReconnectWithin = 30 * time.Second

// Ref is a connection to the local node that holds the job's reference
// (agent.Conn is).
type Ref interface {
	// Done is closed when the connection ended (the reference with it);
	// Err then says why.
	Done() <-chan struct{}
	Err() error
	// Notices delivers what the node reports unasked.
	Notices() <-chan agent.Notice
	// NodePID is the node's process ID.
	NodePID() int
	// Close releases the reference and ends the connection.
	Close() error
}

// Job is one command run holding a reference to package ID.
type Job struct {
	ID   string
	Argv []string // the command and its arguments
	// Pkg is the package's contents directory, given to the command as
	// $GRANARY_PKG.
	Pkg            string
	Stdin          io.Reader
	Stdout, Stderr io.Writer
	// Hold reaches the local node and takes the reference to ID again,
	// after the node went away. It returns an error wrapping
	// core.ErrPackageNotExist if the package is gone, and any other error
	// (no node yet, ...) to be retried.
	Hold func(ctx context.Context) (Ref, error)
}

// Run starts the command holding r's reference and waits for it: it
// forwards signals (Forwarded), passes on the command's exit (ChildExit;
// 127 when it cannot start), and closes r last. If the node goes away it
// takes the reference again with Hold, for at most ReconnectWithin; if the
// package is gone by then, no node comes back, or r reports the reference
// lost, it stops the command (SIGTERM, then SIGKILL 10 s later) and says
// why. Every way of running a job (directly with a store of its own,
// through the node, granary-run) goes through it, so they all say the same
// and exit with the same codes.
func (j *Job) Run(ctx context.Context, r Ref) error {
	l := &loop{j: j, r: r, prog: j.Argv[0], stderr: j.Stderr, reconnected: make(chan held, 1)}
	defer func() { l.r.Close() }()
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, Forwarded...)
	defer signal.Stop(sigs)
	if _, ok := l.stderr.(*os.File); !ok {
		// Run's messages and the command's output (copied by os/exec) go
		// to the same writer.
		l.stderr = &lockedWriter{w: l.stderr}
	}
	var err error
	l.cmd, err = start(j.Argv, append(os.Environ(), EnvPkg+"="+j.Pkg), j.Stdin, j.Stdout, l.stderr)
	if err != nil {
		return &ExitErr{Code: 127, Err: fmt.Errorf("granary: run %s: %w", l.prog, err)}
	}
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	for {
		select {
		case s := <-sigs:
			l.cmd.signal(s)
		case n := <-l.notices():
			l.notice(n)
		case <-l.done():
			l.nodeGone(rctx)
		case h := <-l.reconnected:
			l.held(h)
		case <-l.kill:
			l.cmd.signal(syscall.SIGKILL)
		case err := <-l.cmd.waited:
			return l.exited(rcancel, err)
		}
	}
}

// held is the outcome of a reconnection.
type held struct {
	r   Ref
	err error
}

// loop is the state of Run's select loop; only that loop touches it.
type loop struct {
	j      *Job
	r      Ref // the connection holding the reference
	prog   string
	stderr io.Writer
	cmd    *child

	stopped      error            // why the command was stopped
	kill         <-chan time.Time // SIGKILL after a stop
	reconnecting bool
	reconnected  chan held
}

// done and notices are r's while it is the live connection.
func (l *loop) done() <-chan struct{} {
	if l.reconnecting || l.stopped != nil {
		return nil
	}
	return l.r.Done()
}

func (l *loop) notices() <-chan agent.Notice {
	if l.reconnecting || l.stopped != nil {
		return nil
	}
	return l.r.Notices()
}

// stop stops the command (once) and says why.
func (l *loop) stop(why error) {
	if l.stopped != nil {
		return
	}
	l.stopped = why
	fmt.Fprintf(l.stderr, "granary: %v: stopping %s\n", why, l.prog)
	l.cmd.signal(syscall.SIGTERM)
	l.kill = time.After(10 * time.Second)
}

// notice stops the command when its reference is lost.
func (l *loop) notice(n agent.Notice) {
	if n.Kind == agent.NoticeRefLost && n.ID == l.j.ID {
		l.stop(fmt.Errorf("the reference to %s was lost (%v); the package may be gone", l.j.ID, n.Err))
	}
}

// nodeGone starts taking the reference again in the background.
func (l *loop) nodeGone(ctx context.Context) {
	l.reconnecting = true
	fmt.Fprintf(l.stderr, "granary: the local node went away (%v); reconnecting\n", l.r.Err())
	go func() {
		nr, err := l.j.reconnect(ctx)
		l.reconnected <- held{nr, err}
	}()
}

// held takes the outcome of a reconnection.
func (l *loop) held(h held) {
	l.reconnecting = false
	if h.err != nil {
		l.stop(h.err)
		return
	}
	l.r = h.r
	fmt.Fprintf(l.stderr, "granary: reconnected to the local node (pid %d); holding %s again\n", l.r.NodePID(), l.j.ID)
}

// exited is Run's result once the command exited: a reconnection under
// way is cancelled (and its connection kept, for Run to close).
func (l *loop) exited(cancel context.CancelFunc, err error) error {
	if l.reconnecting {
		cancel()
		if h := <-l.reconnected; h.r != nil {
			l.r = h.r
		}
	}
	if l.stopped != nil {
		return &ExitErr{Code: ExitError, Err: fmt.Errorf("granary: %s stopped: %w", l.prog, l.stopped)}
	}
	return err
}

// reconnect takes the reference again with Hold, retrying with backoff
// for at most ReconnectWithin.
func (j *Job) reconnect(ctx context.Context) (Ref, error) {
	ctx, cancel := context.WithTimeout(ctx, ReconnectWithin)
	defer cancel()
	var last error
	for wait := 50 * time.Millisecond; ; wait = min(2*wait, 2*time.Second) {
		r, err := j.Hold(ctx)
		if err == nil {
			return r, nil
		}
		if errors.Is(err, core.ErrPackageNotExist) {
			return nil, fmt.Errorf("the package %s is gone: it was removed while the local node was away", j.ID)
		}
		last = err
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("the local node did not come back within %v (%v)", ReconnectWithin, last)
		case <-time.After(wait):
		}
	}
}

// child is the job's running command.
type child struct {
	pid    int
	cmd    *exec.Cmd  // nil: started by syscall.ForkExec
	waited chan error // its exit, as ChildExit reports it
}

// start starts argv with env and the given standard streams. When they are
// all files it forks and execs the command itself: os.StartProcess, which
// os/exec uses, first forks a throw-away child to check that the kernel's
// pidfds work, at every launch of a program, and granary-run is all about
// launch time. Otherwise it uses os/exec, which copies to and from
// non-file streams.
func start(argv, env []string, stdin io.Reader, stdout, stderr io.Writer) (*child, error) {
	c := &child{waited: make(chan error, 1)}
	in, ok0 := stdin.(*os.File)
	out, ok1 := stdout.(*os.File)
	errf, ok2 := stderr.(*os.File)
	if !ok0 || !ok1 || !ok2 || in == nil || out == nil || errf == nil {
		c.cmd = exec.Command(argv[0], argv[1:]...)
		c.cmd.Env = env
		c.cmd.Stdin, c.cmd.Stdout, c.cmd.Stderr = stdin, stdout, stderr
		if err := c.cmd.Start(); err != nil {
			return nil, err
		}
		c.pid = c.cmd.Process.Pid
		go func() { c.waited <- ChildExit(c.cmd.Wait()) }()
		return c, nil
	}
	path := argv[0]
	if !strings.Contains(path, "/") {
		p, err := exec.LookPath(path)
		if err != nil {
			return nil, err
		}
		path = p
	}
	pid, err := syscall.ForkExec(path, argv, &syscall.ProcAttr{Env: env, Files: []uintptr{in.Fd(), out.Fd(), errf.Fd()}})
	if err != nil {
		return nil, &os.PathError{Op: "fork/exec", Path: path, Err: err}
	}
	c.pid = pid
	go func() {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(pid, &ws, 0, nil)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				c.waited <- fmt.Errorf("granary: wait for %s: %w", argv[0], err)
				return
			}
			break
		}
		if ws.Exited() && ws.ExitStatus() == 0 {
			c.waited <- nil
			return
		}
		code, _ := waitStatus(ws)
		c.waited <- &ExitErr{Code: code}
	}()
	return c, nil
}

// signal sends sig to the command, which may have exited already.
func (c *child) signal(sig os.Signal) {
	if c.cmd != nil {
		c.cmd.Process.Signal(sig) //nolint:errcheck // it may have exited
		return
	}
	// Only the select loop of Run signals, and it stops once it has
	// received the exit, so the pid is not reused yet, unless the wait
	// above reaped it in between: the same window os/exec has without
	// pidfds.
	if s, ok := sig.(syscall.Signal); ok {
		syscall.Kill(c.pid, s) //nolint:errcheck // it may have exited
	}
}

// lockedWriter serialises the writes to w.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
