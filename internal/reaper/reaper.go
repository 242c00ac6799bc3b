//go:build linux

// Package reaper keeps a builder's process tree from outliving the process
// that runs it.
//
// A builder runs under a guard: a re-execution of the current program that
// makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), starts the
// builder in its own process group, and kills every one of its descendants
// (SIGKILL) when any of these happens:
//
//   - the builder exits (nothing it started in the background survives);
//   - the process that started the guard dies, however (even SIGKILL): the
//     guard holds the read end of a pipe whose only write end is in that
//     process, and sees end-of-file;
//   - that process cancels the build (the command's context ends: the
//     build was interrupted or its lease is in doubt), which closes the
//     pipe.
//
// Being a subreaper, the guard inherits every orphaned descendant, including
// one that started its own session (setsid) or daemonized: none escapes to
// PID 1, so none escapes the kill. The guard survives SIGINT, SIGTERM,
// SIGHUP and SIGQUIT (a terminal's ^C reaches it with its parent) and acts
// only on the pipe. The builder also gets a parent-death signal (SIGKILL),
// for the case where the guard itself is killed.
//
// The builder starts with every signal at its default action and none
// blocked, whatever the process that runs it inherited (nohup, a shell's
// background job, a daemon's thread): the guard catches the signals it
// must survive instead of ignoring them (exec resets a caught signal to
// its default, not an ignored one), and forks the builder from a thread
// whose signal mask it emptied (the child of a Go fork gets the forking
// thread's mask). So `timeout`, `kill` and a builder's own SIGTERM work
// in a build as they do outside. (Signals 32 to 34, the C libraries'
// own, are the exception: the Go runtime installs no handler for them, so
// if this process inherited them ignored, the builder does too.)
//
// How the builder ended comes back on a second pipe: the guard writes the
// builder's wait status there, then exits with the code a shell would
// give (the status, or 128+N for signal N), and Wait returns an
// *ExitError with the builder's status. The guard never dies of the
// builder's signal: a Go program killed by SIGSEGV, SIGABRT or SIGQUIT
// prints the runtime's crash dump first, on the builder's stderr (the
// build log).
//
// What remains to chance: a SIGKILL of the guard itself (by pid, or the
// OOM killer) leaves the builder's own descendants running; a frozen host
// (or a stopped guard) kills nothing, so another host that takes over must
// still rely on the lease, the lock delay and fencing (see docs/design.md).
//
// Programs that use Command must call Main first thing in main (and in
// TestMain), so that the re-executed program becomes the guard.
package reaper

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// envGuard marks the re-executed program as a guard.
const envGuard = "GRANARY_REAPER_GUARD"

// The guard's end of its two pipes to the process that started it.
const (
	fdLifeline = 3 // read end: end-of-file when the parent died or cancelled
	fdStatus   = 4 // write end: the builder's wait status, in decimal, then EOF
)

// guardCatches are the signals the guard must survive to kill the tree:
// those a terminal or a job control system sends to a whole process group
// or session (the guard is in its parent's).
var guardCatches = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT}

// Main turns this process into a guard if it was started as one by
// Command: it then runs the builder and exits, never returning. Otherwise
// it returns at once.
func Main() {
	if os.Getenv(envGuard) != "1" {
		return
	}
	os.Exit(guard(os.Args[1:]))
}

// Cmd is a command run under a guard. Set the embedded exec.Cmd's
// environment, standard streams and working directory as for any command;
// they pass through the guard to the builder. Use Cmd's Start, Wait and
// Run, not the embedded ones.
type Cmd struct {
	*exec.Cmd
	lifeline *os.File // write end; closing it kills the builder's tree
	status   *os.File // read end; the guard reports the builder's status
	once     sync.Once
}

// Command returns a command that runs argv under a guard. Wait's error for
// a builder that did not exit 0 is an *ExitError with the builder's status
// (the guard exits with the same code, or 128+N for signal N).
// Cancelling ctx kills the builder's whole tree; the guard then exits at
// once (after WaitDelay, exec kills the guard).
func Command(ctx context.Context, argv ...string) (*Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("empty command")
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("cannot re-execute this program as the builder's guard: %w", err)
	}
	c := &Cmd{Cmd: exec.CommandContext(ctx, exe, argv...)}
	c.Env = os.Environ()
	c.WaitDelay = 5 * time.Second
	c.Cancel = func() error {
		c.closeLifeline()
		return nil
	}
	return c, nil
}

func (c *Cmd) closeLifeline() {
	c.once.Do(func() {
		if c.lifeline != nil {
			c.lifeline.Close()
		}
	})
}

// Start starts the guard, which starts the builder. The lifeline's write
// end stays open in this process only, so its death closes it; the status
// pipe's write end is in the guard only, so its exit closes it.
func (c *Cmd) Start() error {
	lr, lw, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("pipe to the builder's guard: %w", err)
	}
	sr, sw, err := os.Pipe()
	if err != nil {
		lr.Close()
		lw.Close()
		return fmt.Errorf("pipe to the builder's guard: %w", err)
	}
	c.lifeline, c.status = lw, sr
	c.ExtraFiles = []*os.File{lr, sw} // fdLifeline and fdStatus in the guard
	c.Env = append(c.Env, envGuard+"=1")
	err = c.Cmd.Start()
	lr.Close()
	sw.Close()
	if err != nil {
		c.closeLifeline()
		sr.Close()
	}
	return err
}

// Wait waits for the guard (so for the builder and its whole tree). If the
// builder did not exit 0, its error is an *ExitError (wrapping the guard's
// *exec.ExitError); if the guard died before it could say how the builder
// ended (it was killed), the guard's *exec.ExitError.
func (c *Cmd) Wait() error {
	err := c.Cmd.Wait()
	c.closeLifeline()
	ws, ok := c.builderStatus()
	if xe, isExit := err.(*exec.ExitError); isExit && ok && !(ws.Exited() && ws.ExitStatus() == 0) {
		return &ExitError{Status: ws, guard: xe}
	}
	return err
}

// builderStatus reads the builder's status that the guard reported. The
// guard, its only writer, has exited: the read does not block.
func (c *Cmd) builderStatus() (syscall.WaitStatus, bool) {
	b, err := io.ReadAll(io.LimitReader(c.status, 32))
	c.status.Close()
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseUint(strings.TrimSuffix(string(b), "\n"), 10, 32)
	if err != nil {
		return 0, false
	}
	return syscall.WaitStatus(n), true
}

// Run starts the command and waits for it.
func (c *Cmd) Run() error {
	if err := c.Start(); err != nil {
		return err
	}
	return c.Wait()
}

// guard runs argv and kills its tree; it reports the builder's status on
// fdStatus and returns the exit code.
func guard(argv []string) int {
	// Caught, not ignored: a caught signal is back to its default action
	// in the builder (exec resets handlers), an ignored one would stay
	// ignored there. Nothing reads the channel: Notify drops what does not
	// fit, and the guard acts on the lifeline only.
	signal.Notify(make(chan os.Signal, 1), guardCatches...)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "granary: builder guard: cannot become a child subreaper: %v\n", err)
		return 126
	}
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "granary: builder guard: no command")
		return 126
	}
	// The builder must not hold these: the status pipe's end-of-file tells
	// the parent that the guard is gone.
	syscall.CloseOnExec(fdLifeline)
	syscall.CloseOnExec(fdStatus)
	lifeline := os.NewFile(fdLifeline, "lifeline")
	statusw := os.NewFile(fdStatus, "status")
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envGuard+"=") {
			env = append(env, kv)
		}
	}
	path, err := exec.LookPath(argv[0])
	if err != nil {
		fmt.Fprintf(os.Stderr, "granary: %v\n", err)
		return 127
	}
	// The parent-death signal follows the thread that forks, and the child
	// gets that thread's signal mask: keep the thread.
	runtime.LockOSThread()
	p, err := startBuilder(path, argv, env)
	if err != nil {
		fmt.Fprintf(os.Stderr, "granary: %v\n", err)
		return 126
	}
	return reapAll(p.Pid, watchLifeline(lifeline), reapChildren(), statusw)
}

// watchLifeline returns a channel closed when the lifeline's read ends:
// the parent died or closed its end on purpose.
func watchLifeline(lifeline *os.File) <-chan struct{} {
	gone := make(chan struct{})
	go func() {
		buf := make([]byte, 1)
		for {
			if _, err := lifeline.Read(buf); err != nil {
				close(gone)
				return
			}
		}
	}()
	return gone
}

// reaped is one child the guard waited for (err ECHILD: none is left).
type reaped struct {
	pid int
	ws  syscall.WaitStatus
	err error
}

// reapChildren waits for every child of the guard (its own and the
// orphans re-parented to it) and sends each; it ends after sending the
// error that says no child is left.
func reapChildren() <-chan reaped {
	reapc := make(chan reaped)
	go func() {
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, 0, nil)
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			reapc <- reaped{pid, ws, err}
			if err != nil {
				return
			}
		}
	}()
	return reapc
}

// reapAll kills every descendant once the parent is gone or the builder
// has exited, again after each child it reaps, until none is left; then it
// writes the builder's wait status on statusw and returns the shell's exit
// code for it (128+SIGKILL if the builder's status was never seen).
func reapAll(builder int, parentGone <-chan struct{}, reapc <-chan reaped, statusw *os.File) int {
	var status *syscall.WaitStatus
	killing := false
	for {
		select {
		case <-parentGone:
			parentGone = nil
			killing = true
			killDescendants()
		case r := <-reapc:
			if r.err != nil { // ECHILD: nothing left
				if status == nil {
					return 128 + int(syscall.SIGKILL)
				}
				// If the parent is gone, the write fails (EPIPE; SIGPIPE
				// kills a Go program for fds 1 and 2 only).
				fmt.Fprintf(statusw, "%d\n", uint32(*status)) //nolint:errcheck // the exit code says the same
				return shellCode(*status)
			}
			if r.pid == builder {
				ws := r.ws
				status = &ws
				killing = true
			}
			if killing {
				killDescendants()
			}
		}
	}
}

// startBuilder starts the builder in its own process group, with the
// parent-death signal, and with an empty signal mask: the Go runtime forks
// with the mask of the calling thread (it saves it before the fork and
// restores it in the child), which holds what this process inherited, so
// the thread's mask is emptied for the fork and put back after. It must
// run on a locked thread.
func startBuilder(path string, argv, env []string) (*os.Process, error) {
	var empty, old unix.Sigset_t
	if err := unix.PthreadSigmask(unix.SIG_SETMASK, &empty, &old); err != nil {
		return nil, fmt.Errorf("cannot empty the signal mask: %w", err)
	}
	defer unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil) //nolint:errcheck // it was set above
	return os.StartProcess(path, argv, &os.ProcAttr{
		Env:   env,
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL},
	})
}

// killDescendants sends SIGKILL to every descendant of this process, found
// through /proc. Orphans of killed processes come to us (subreaper) and
// are found on the next call, which follows each reaped child.
func killDescendants() {
	for _, pid := range descendants(os.Getpid()) {
		syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // it may be gone
	}
}

// descendants lists the processes below root in the process tree.
func descendants(root int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid, ok := parentOf(pid); ok {
			children[ppid] = append(children[ppid], pid)
		}
	}
	var out []int
	queue := []int{root}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		for _, c := range children[p] {
			out = append(out, c)
			queue = append(queue, c)
		}
	}
	return out
}

// parentOf reads the parent pid from /proc/<pid>/stat.
func parentOf(pid int) (int, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// pid (comm) state ppid ...; comm may contain spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	return ppid, err == nil
}

// signalName is sig's name ("SIGSEGV"), or "" for a real-time signal.
func signalName(sig syscall.Signal) string { return unix.SignalName(sig) }
