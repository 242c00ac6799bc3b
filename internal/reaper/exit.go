package reaper

import (
	"fmt"
	"os/exec"
	"strconv"
	"syscall"
)

// ExitError is the error of Cmd's Wait and Run for a builder that did not
// exit with status 0. Status is the builder's own, as its guard reaped it
// and reported it over a pipe; the guard itself exits with Code, so that
// it never dies of the builder's signal (a Go program that dies of SIGSEGV
// or SIGABRT prints the runtime's crash dump first), and Unwrap returns
// its *exec.ExitError.
//
// ExitCode and Sys are os.ProcessState's methods, for the builder: code
// that reads a process's status through them (errors.As to an interface
// with both) reads the builder's, not the guard's.
//
// Only Linux has a guard: elsewhere, Wait's error is the builder's own
// *exec.ExitError.
type ExitError struct {
	Status syscall.WaitStatus // how the builder ended
	guard  *exec.ExitError
}

// Error is what an *exec.ExitError of the builder's would say: "exit
// status 3", "signal: segmentation fault".
func (e *ExitError) Error() string {
	ws := e.Status
	if !ws.Signaled() {
		return "exit status " + strconv.Itoa(ws.ExitStatus())
	}
	s := "signal: " + ws.Signal().String()
	if ws.CoreDump() {
		s += " (core dumped)"
	}
	return s
}

// How says how the builder ended, in words to follow its name: "exited
// with status 3", "was killed by signal SIGSEGV (segmentation fault)".
func (e *ExitError) How() string {
	ws := e.Status
	if !ws.Signaled() {
		return fmt.Sprintf("exited with status %d", ws.ExitStatus())
	}
	sig := ws.Signal()
	how := "was killed by signal " + strconv.Itoa(int(sig))
	if name := signalName(sig); name != "" {
		how = fmt.Sprintf("was killed by signal %s (%v)", name, sig)
	}
	if ws.CoreDump() {
		how += ", core dumped"
	}
	return how
}

// Code is the exit code a shell gives for the builder, and the guard's
// own: the builder's exit status, or 128+N when signal N killed it.
func (e *ExitError) Code() int { return shellCode(e.Status) }

// ExitCode is the builder's exit status, or -1 if a signal killed it (as
// os.ProcessState's).
func (e *ExitError) ExitCode() int {
	if e.Status.Signaled() {
		return -1
	}
	return e.Status.ExitStatus()
}

// Sys returns the builder's syscall.WaitStatus (as os.ProcessState's).
func (e *ExitError) Sys() any { return e.Status }

// Unwrap returns the guard's *exec.ExitError.
func (e *ExitError) Unwrap() error { return e.guard }

// shellCode is the exit code a shell gives for a child that ended with
// ws: its exit status, or 128+N when signal N killed it.
func shellCode(ws syscall.WaitStatus) int {
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}
