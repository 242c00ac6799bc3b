package cli

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"
)

// TestWaitExit: waitExit returns once the process has exited (here a
// child left a zombie until it is reaped), and not before: a process that
// still runs outlives a short deadline. The child blocks on its stdin, so
// its exit is our doing, not a timer's.
func TestWaitExit(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command("sh", "-c", "read x")
	cmd.Stdin = r
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	err = waitExit(ctx, cmd.Process.Pid)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waitExit on a running process = %v, want the deadline", err)
	}

	w.Close() // read gets EOF: sh exits
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := waitExit(ctx, cmd.Process.Pid); err != nil {
		t.Fatalf("waitExit after the process exited = %v, want nil", err)
	}
	if err := pollExit(ctx, cmd.Process.Pid); err != nil {
		t.Fatalf("pollExit after the process exited (a zombie) = %v, want nil", err)
	}
}
