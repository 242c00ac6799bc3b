//go:build linux

package reaper_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/testutil"

	"github.com/granary-build/granary/internal/reaper"
)

const roleEnv = "REAPER_TEST_ROLE"

func TestMain(m *testing.M) {
	reaper.Main()
	if os.Getenv(roleEnv) != "" {
		os.Exit(parentMain())
	}
	testutil.MustTestMainWithLeakDetection(m)
}

// builderScript starts a grandchild in its own session (it escapes the
// builder's process group), writes both pids, and waits.
const builderScript = `setsid sh -c 'echo $$ > "$DIR/grandchild.pid"; exec sleep 600' &
echo $$ > "$DIR/builder.pid"
exec sleep 600`

// parentMain is the re-executed test binary standing in for `granary
// build`: it starts the builder (guarded or not) and waits to be killed,
// or, as "hostile" and "hostile-plain", runs a command from a process
// that ignores and blocks signals (see hostileMain).
func parentMain() int {
	var err error
	switch os.Getenv(roleEnv) {
	case "hostile", "hostile-plain":
		return hostileMain(os.Getenv(roleEnv) == "hostile")
	case "guarded":
		var c *reaper.Cmd
		c, err = reaper.Command(context.Background(), "sh", "-c", builderScript)
		if err == nil {
			err = c.Start()
		}
	case "plain":
		c := exec.Command("sh", "-c", builderScript)
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		err = c.Start()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	select {} // until killed
}

func waitFile(t *testing.T, path string) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, err := os.ReadFile(path)
		if err == nil && bytes.HasSuffix(b, []byte("\n")) {
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatal(err)
			}
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not written", path)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive reports whether pid runs (not a zombie).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// gone waits until pid no longer runs, for at most 10 s.
func gone(pid int) bool {
	for range 500 {
		if !alive(pid) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// TestKill9OfParentKillsTree: kill -9 of the process that runs a guarded
// builder kills the builder and its grandchild that started its own
// session. Without the guard (the control case), the grandchild survives.
func TestKill9OfParentKillsTree(t *testing.T) {
	for _, role := range []string{"guarded", "plain"} {
		t.Run(role, func(t *testing.T) {
			dir := t.TempDir()
			p := exec.Command(os.Args[0])
			p.Env = append(os.Environ(), roleEnv+"="+role, "DIR="+dir)
			p.Stderr = os.Stderr
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
			builder := waitFile(t, filepath.Join(dir, "builder.pid"))
			grandchild := waitFile(t, filepath.Join(dir, "grandchild.pid"))
			t.Cleanup(func() {
				syscall.Kill(builder, syscall.SIGKILL)
				syscall.Kill(grandchild, syscall.SIGKILL)
			})
			if err := p.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			p.Wait()
			switch role {
			case "guarded":
				if !gone(builder) {
					t.Errorf("builder %d survived kill -9 of its parent", builder)
				}
				if !gone(grandchild) {
					t.Errorf("grandchild %d (own session) survived kill -9 of the builder's parent", grandchild)
				}
			case "plain":
				if !alive(grandchild) {
					t.Errorf("without the guard the grandchild died too: this test cannot tell the guard works")
				}
			}
		})
	}
}

// TestCancelKillsTreeAndStatusPassesThrough: cancelling the context kills
// the tree; a builder's exit code reaches the caller unchanged.
func TestCancelKillsTreeAndStatusPassesThrough(t *testing.T) {
	c, err := reaper.Command(context.Background(), "sh", "-c", "exit 7")
	if err != nil {
		t.Fatal(err)
	}
	var xe *exec.ExitError
	if err := c.Run(); !errors.As(err, &xe) || xe.ExitCode() != 7 {
		t.Fatalf("exit 7 under the guard: %v", err)
	}

	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	c, err = reaper.Command(ctx, "sh", "-c", builderScript)
	if err != nil {
		t.Fatal(err)
	}
	c.Env = append(c.Env, "DIR="+dir)
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	grandchild := waitFile(t, filepath.Join(dir, "grandchild.pid"))
	t.Cleanup(func() { syscall.Kill(grandchild, syscall.SIGKILL) })
	cancel()
	if err := c.Wait(); err == nil {
		t.Error("a cancelled build exited 0")
	}
	if alive(grandchild) {
		t.Errorf("grandchild %d survived the cancellation (Wait returned while it ran)", grandchild)
	}
}
