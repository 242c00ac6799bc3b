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
// PID 1, so none escapes the kill. The guard ignores SIGINT, SIGTERM and
// SIGHUP (a terminal's ^C reaches it with its parent) and acts only on the
// pipe. The builder also gets a parent-death signal (SIGKILL), for the case
// where the guard itself is killed.
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
	once     sync.Once
}

// Command returns a command that runs argv under a guard. Its exit status
// is the builder's (a builder killed by a signal makes the guard kill
// itself with that signal). Cancelling ctx kills the builder's whole tree;
// the guard then exits at once (after WaitDelay, exec kills the guard).
func Command(ctx context.Context, argv ...string) (*Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("reaper: empty command")
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("reaper: cannot re-execute this program as the guard: %w", err)
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

// Start starts the guard, which starts the builder. The pipe's write end
// stays open in this process only, so its death closes it.
func (c *Cmd) Start() error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("reaper: %w", err)
	}
	c.lifeline = w
	c.ExtraFiles = []*os.File{r}
	c.Env = append(c.Env, envGuard+"=1")
	err = c.Cmd.Start()
	r.Close()
	if err != nil {
		c.closeLifeline()
	}
	return err
}

// Wait waits for the guard (so for the builder and its whole tree).
func (c *Cmd) Wait() error {
	err := c.Cmd.Wait()
	c.closeLifeline()
	return err
}

// Run starts the command and waits for it.
func (c *Cmd) Run() error {
	if err := c.Start(); err != nil {
		return err
	}
	return c.Wait()
}

// guard runs argv and kills its tree; it returns the exit code.
func guard(argv []string) int {
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT)
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "granary: builder guard: cannot become a child subreaper: %v\n", err)
		return 126
	}
	if len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "granary: builder guard: no command")
		return 126
	}
	syscall.CloseOnExec(3) // the builder need not hold it
	lifeline := os.NewFile(3, "lifeline")
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
	// The parent-death signal follows the thread that forks: keep it.
	runtime.LockOSThread()
	p, err := os.StartProcess(path, argv, &os.ProcAttr{
		Env:   env,
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		Sys:   &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "granary: %v\n", err)
		return 126
	}
	builder := p.Pid

	parentGone := make(chan struct{})
	go func() {
		buf := make([]byte, 1)
		for {
			if _, err := lifeline.Read(buf); err != nil {
				close(parentGone)
				return
			}
		}
	}()
	type reaped struct {
		pid int
		ws  syscall.WaitStatus
		err error
	}
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
				return exitCode(*status)
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

// exitCode passes on the builder's status: its code, or its signal (the
// guard kills itself with it, so the caller sees the same).
func exitCode(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		sig := ws.Signal()
		signal.Reset(sig)
		syscall.Kill(os.Getpid(), sig) //nolint:errcheck // falls through to 128+sig
		return 128 + int(sig)
	}
	return ws.ExitStatus()
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
