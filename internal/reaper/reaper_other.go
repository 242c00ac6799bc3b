//go:build !linux

package reaper

import (
	"context"
	"errors"
	"os/exec"
	"syscall"
	"time"
)

// Cmd is a command; without Linux's child subreaper there is no guard, and
// the builder's descendants can outlive it.
type Cmd struct{ *exec.Cmd }

// Main does nothing here.
func Main() {}

// Command returns a plain command for argv.
func Command(ctx context.Context, argv ...string) (*Cmd, error) {
	if len(argv) == 0 {
		return nil, errors.New("empty command")
	}
	c := exec.CommandContext(ctx, argv[0], argv[1:]...)
	c.WaitDelay = 5 * time.Second
	return &Cmd{c}, nil
}

// signalName is used by ExitError, which Wait does not return here (there
// is no guard: Wait's error is the builder's *exec.ExitError).
func signalName(syscall.Signal) string { return "" }
