//go:build linux

package cli

import (
	"context"
	"errors"
	"time"

	"golang.org/x/sys/unix"
)

// waitExit waits until process pid has exited (a zombie has), or ctx
// ends. On Linux it polls a pidfd, which becomes readable when the process
// exits; without pidfds (before 5.3) it falls back to polling.
func waitExit(ctx context.Context, pid int) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil // gone already
	}
	if err != nil {
		return pollExit(ctx, pid)
	}
	defer unix.Close(fd)
	for {
		deadline, ok := ctx.Deadline()
		ms := 100
		if ok {
			ms = int(min(time.Until(deadline), 100*time.Millisecond) / time.Millisecond)
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, max(ms, 0))
		if err != nil && !errors.Is(err, unix.EINTR) {
			return err
		}
		if n > 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}
