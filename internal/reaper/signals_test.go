//go:build linux

package reaper_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/granary-build/granary/internal/reaper"
)

// What a `granary build` may inherit and pass on: signals ignored (nohup,
// a shell's background job, `trap "" TERM`) and blocked (a thread of a daemon
// that takes its signals with sigwait).
var (
	hostileIgnored = []syscall.Signal{syscall.SIGHUP, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGPIPE}
	hostileBlocked = []syscall.Signal{syscall.SIGHUP, syscall.SIGTERM, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGALRM}
)

// statusArgv prints the signal lines of its own /proc status. (Not a
// shell: dash empties its signal mask when it starts.)
var statusArgv = []string{"grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"}

// sigBits is the mask of sigs, as /proc/<pid>/status shows sets of
// signals (bit N-1 for signal N).
func sigBits(sigs []syscall.Signal) uint64 {
	var m uint64
	for _, s := range sigs {
		m |= 1 << (s - 1)
	}
	return m
}

// hostileMain runs os.Args[1:] from a process that ignores hostileIgnored
// and blocks hostileBlocked: under a guard (role "hostile") or as a plain
// child (role "hostile-plain", the control case). Its exit code is the
// guard's (or the child's); 254 if it cannot run it.
func hostileMain(guarded bool) int {
	for _, s := range hostileIgnored {
		signal.Ignore(s)
	}
	// The Go runtime forks with the signal mask of the thread that forks:
	// block on this one, and start the child from it.
	runtime.LockOSThread()
	var set unix.Sigset_t
	set.Val[0] = sigBits(hostileBlocked)
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &set, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 254
	}
	argv := os.Args[1:]
	var err error
	if guarded {
		var c *reaper.Cmd
		if c, err = reaper.Command(context.Background(), argv...); err == nil {
			c.Stdout, c.Stderr = os.Stdout, os.Stderr
			err = c.Run()
		}
	} else {
		c := exec.Command(argv[0], argv[1:]...)
		c.Stdout, c.Stderr = os.Stdout, os.Stderr
		err = c.Run()
	}
	var xe *exec.ExitError
	switch {
	case errors.As(err, &xe):
		return xe.ExitCode()
	case err != nil:
		fmt.Fprintln(os.Stderr, err)
		return 254
	}
	return 0
}

// runHostile runs argv with hostileMain; it returns the standard output
// and the exit code.
func runHostile(t *testing.T, guarded bool, argv ...string) (string, int) {
	t.Helper()
	role := "hostile-plain"
	if guarded {
		role = "hostile"
	}
	p := exec.Command(os.Args[0], argv...)
	p.Env = append(os.Environ(), roleEnv+"="+role)
	var stderr bytes.Buffer
	p.Stderr = &stderr
	out, err := p.Output()
	var xe *exec.ExitError
	if err != nil && !errors.As(err, &xe) || xe != nil && xe.ExitCode() == 254 {
		t.Fatalf("hostile parent: %v\n%s", err, stderr.Bytes())
	}
	t.Logf("%s %q: exit code %d, stderr %q", role, argv, p.ProcessState.ExitCode(), stderr.String())
	return string(out), p.ProcessState.ExitCode()
}

// sigLines parses the SigIgn and SigBlk lines statusArgv printed.
func sigLines(t *testing.T, out string) map[string]uint64 {
	t.Helper()
	m := map[string]uint64{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		k, v, _ := strings.Cut(line, ":")
		n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		m[k] = n
	}
	if len(m) != 2 {
		t.Fatalf("want SigIgn and SigBlk, got %q", out)
	}
	return m
}

// TestBuilderStartsWithDefaultSignals: a builder run by a process that
// ignores and blocks signals starts with no signal ignored and none
// blocked (/proc/<builder>/status). The control case, a plain child of
// the same process, inherits both.
func TestBuilderStartsWithDefaultSignals(t *testing.T) {
	out, _ := runHostile(t, false, statusArgv...)
	plain := sigLines(t, out)
	if got, want := plain["SigIgn"], sigBits(hostileIgnored); got != want {
		t.Errorf("control: a plain child has SigIgn %016x, want %016x: this test cannot tell the guard works", got, want)
	}
	if got, want := plain["SigBlk"], sigBits(hostileBlocked); got != want {
		t.Errorf("control: a plain child has SigBlk %016x, want %016x: this test cannot tell the guard works", got, want)
	}
	out, _ = runHostile(t, true, statusArgv...)
	guarded := sigLines(t, out)
	for _, k := range []string{"SigIgn", "SigBlk"} {
		if guarded[k] != 0 {
			t.Errorf("the builder's %s is %016x, want 0", k, guarded[k])
		}
	}
}

// terminating lists the signals whose default action ends the process
// (signal(7)): all but those ignored by default (SIGCHLD, SIGURG,
// SIGWINCH), SIGCONT and the stop signals. SIGKILL is there too.
func terminating() []syscall.Signal {
	var out []syscall.Signal
	for s := syscall.Signal(1); s <= 64; s++ {
		switch s {
		case syscall.SIGCHLD, syscall.SIGURG, syscall.SIGWINCH, syscall.SIGCONT,
			syscall.SIGSTOP, syscall.SIGTSTP, syscall.SIGTTIN, syscall.SIGTTOU:
			continue
		}
		out = append(out, s)
	}
	return out
}

// TestBuilderKilledBySignal: a builder that kills itself with signal N,
// for every signal that ends a process, ends its guarded command with an
// ExitError that names the signal, the shell's code 128+N, and nothing
// on the standard streams (the guard exits with the code; it does not
// die of the signal, which would print the Go runtime's dump for SIGSEGV,
// SIGABRT, SIGQUIT and others).
func TestBuilderKilledBySignal(t *testing.T) {
	for _, sig := range terminating() {
		t.Run(strconv.Itoa(int(sig)), func(t *testing.T) {
			c, err := reaper.Command(context.Background(), "sh", "-c", fmt.Sprintf("ulimit -c 0; kill -%d $$; echo survived", sig))
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			c.Stdout, c.Stderr = &out, &out
			err = c.Run()
			var be *reaper.ExitError
			if !errors.As(err, &be) {
				t.Fatalf("got %v (%T), want a *reaper.ExitError", err, err)
			}
			if !be.Status.Signaled() || be.Status.Signal() != sig {
				t.Errorf("builder's status %#x, want killed by signal %d", uint32(be.Status), sig)
			}
			if got, want := be.Code(), 128+int(sig); got != want {
				t.Errorf("Code() = %d, want %d", got, want)
			}
			if got := be.ExitCode(); got != -1 {
				t.Errorf("ExitCode() = %d, want -1 (as os.ProcessState for a signal)", got)
			}
			var xe *exec.ExitError
			if !errors.As(err, &xe) {
				t.Fatalf("%v does not wrap the guard's *exec.ExitError", err)
			}
			if ws := xe.Sys().(syscall.WaitStatus); ws.Signaled() || ws.ExitStatus() != 128+int(sig) {
				t.Errorf("the guard's status %#x, want exit code %d", uint32(ws), 128+int(sig))
			}
			if out.Len() > 0 {
				t.Errorf("output: %q, want none", out.String())
			}
		})
	}
}

// TestExitErrorMessage: how an ExitError reads: Error as os/exec's
// would for the builder, How for a message that names it.
func TestExitErrorMessage(t *testing.T) {
	tests := []struct {
		name   string
		script string
		err    string
		how    string
		code   int
	}{
		{"exit", "exit 7", "exit status 7", "exited with status 7", 7},
		{"SIGSEGV", "ulimit -c 0; kill -SEGV $$", "signal: segmentation fault", "was killed by signal SIGSEGV (segmentation fault)", 139},
		{"SIGTERM", "kill -TERM $$", "signal: terminated", "was killed by signal SIGTERM (terminated)", 143},
		{"real-time", "kill -40 $$", "signal: signal 40", "was killed by signal 40", 168},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := reaper.Command(context.Background(), "sh", "-c", tt.script)
			if err != nil {
				t.Fatal(err)
			}
			err = c.Run()
			var be *reaper.ExitError
			if !errors.As(err, &be) {
				t.Fatalf("got %v (%T), want a *reaper.ExitError", err, err)
			}
			if got := be.Error(); got != tt.err {
				t.Errorf("Error() = %q, want %q", got, tt.err)
			}
			if got := be.How(); got != tt.how {
				t.Errorf("How() = %q, want %q", got, tt.how)
			}
			if got := be.Code(); got != tt.code {
				t.Errorf("Code() = %d, want %d", got, tt.code)
			}
		})
	}
}

// TestSignalsWorkInsideBuilder: what a builder runs can be stopped by
// signals, even when `granary build` inherited them ignored and blocked
// (hostileMain): `timeout` stops its command (GNU timeout passes on the
// signal mask it inherited; SIGUSR1 because the Go runtime unblocks
// SIGTERM in its threads, so a Go guard never passed SIGTERM on
// blocked), a shell kills its background job (dash empties its mask but
// passes on ignored signals), a builder that sends itself SIGTERM dies of
// it. Each command would take 20 s and exit 0 if the signal reached it
// ignored or blocked.
func TestSignalsWorkInsideBuilder(t *testing.T) {
	tests := []struct {
		name string
		argv []string
		sig  syscall.Signal
	}{
		{"timeout", []string{"timeout", "-s", "USR1", "--preserve-status", "1", "sleep", "20"}, syscall.SIGUSR1},
		{"kill of a background job", []string{"sh", "-c", "sleep 20 & kill $!; wait $!"}, syscall.SIGTERM},
		{"SIGTERM to itself", []string{"sh", "-c", "kill -TERM $$; sleep 20"}, syscall.SIGTERM},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := exec.LookPath(tt.argv[0]); err != nil {
				t.Skip(err)
			}
			if _, code := runHostile(t, true, tt.argv...); code != 128+int(tt.sig) {
				t.Errorf("exit code %d, want %d (%v)", code, 128+int(tt.sig), tt.sig)
			}
		})
	}
}
