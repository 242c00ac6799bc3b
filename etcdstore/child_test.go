package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// Child processes are this test binary re-executed with childEnv set to a
// mode; they talk to the parent's embedded etcd over its unix socket.
const childEnv = "GRANARY_TEST_CHILD"

// childMain runs in a child process: it builds package $ID with
// $GOROUTINES goroutines. The builder appends a line to $ROOT/builds.log,
// writes $ROOT/started-<pid>, then either finishes after a short while
// ("build") or writes a partial file and hangs until killed ("hang").
func childMain() int {
	mode, root, id := os.Getenv(childEnv), os.Getenv("ROOT"), os.Getenv("ID")
	cli, err := clientv3.New(etcdtest.ClientConfig(os.Getenv("ENDPOINT")))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer cli.Close()
	s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL), etcdstore.WithLockDelay(200*time.Millisecond))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	n, _ := strconv.Atoi(os.Getenv("GOROUTINES"))
	procs, _ := strconv.Atoi(os.Getenv("PROCS"))
	h := s.Handle(id)
	builder := func() error {
		if err := appendLine(filepath.Join(root, "builds.log"), fmt.Sprintf("%s %d", mode, os.Getpid())); err != nil {
			return err
		}
		if mode == "hang" {
			os.WriteFile(filepath.Join(h.OutputDirectory(), "partial"), []byte("half"), 0o644)
			os.WriteFile(filepath.Join(root, fmt.Sprintf("started-%d", os.Getpid())), nil, 0o644)
			select {} // killed here
		}
		os.WriteFile(filepath.Join(root, fmt.Sprintf("started-%d", os.Getpid())), nil, 0o644)
		// Let the other processes pile up behind the lock: the builder
		// finishes only once every process has its key in the lock queue,
		// so the test covers waiters in other processes, not latecomers
		// who find the package published.
		if err := awaitQueue(cli, etcdstore.LockPrefix(s, id), procs); err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "data"), []byte("complete"), 0o644)
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Go(func() { errs <- h.Build(builder) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			fmt.Fprintln(os.Stderr, "build:", err)
			return 1
		}
	}
	return 0
}

// awaitQueue waits until the lock queue under pfx holds at least n keys,
// by a watch from the revision of each count; it gives up after a minute
// (a process that never queued is then the test's failure).
func awaitQueue(cli *clientv3.Client, pfx string, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		resp, err := cli.Get(ctx, pfx, clientv3.WithPrefix(), clientv3.WithCountOnly())
		if err != nil {
			return fmt.Errorf("lock queue %s: want %d processes in it: %w", pfx, n, err)
		}
		if resp.Count >= int64(n) {
			return nil
		}
		wch := cli.Watch(ctx, pfx, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		if _, ok := <-wch; !ok {
			return fmt.Errorf("lock queue %s: %d of %d processes in it: %w", pfx, resp.Count, n, ctx.Err())
		}
	}
}

func appendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(f, line)
	return errors.Join(err, f.Close())
}

// child starts this test binary as one process of procs that build id
// (mode "build") or as a builder that hangs until killed (mode "hang").
func child(t *testing.T, srv *etcdtest.Server, mode, root, id string, goroutines, procs int) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, "ENDPOINT="+srv.Endpoint, "ROOT="+root, "ID="+id,
		"GOROUTINES="+strconv.Itoa(goroutines), "PROCS="+strconv.Itoa(procs))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func buildLines(t *testing.T, root string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, "builds.log"))
	if err != nil {
		t.Fatalf("read builds.log: %v", err)
	}
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// TestBuildOnceProcesses: three OS processes, four goroutines each, one
// root and one etcd: the builder runs once.
func TestBuildOnceProcesses(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	var cmds []*exec.Cmd
	for range 3 {
		cmds = append(cmds, child(t, srv, "build", root, "multi-proc", 4, 3))
	}
	for i, c := range cmds {
		if err := c.Wait(); err != nil {
			t.Fatalf("child %d: %v", i, err)
		}
	}
	b, _ := os.ReadFile(filepath.Join(root, "builds.log"))
	if n := strings.Count(string(b), "\n"); n != 1 {
		t.Fatalf("builder ran %d times across 3 processes, want 1:\n%s", n, b)
	}
}

// TestBuilderKilled: a builder process killed with SIGKILL mid-build; a
// build in this process completes once the dead lease expires, and the
// dead attempt's partial tree is never published.
func TestBuilderKilled(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	victim := child(t, srv, "hang", root, "killed", 1, 1)
	started := filepath.Join(root, fmt.Sprintf("started-%d", victim.Process.Pid))
	waitFile(t, started)

	s := newStore(t, srv, root)
	h := s.Handle("killed")
	done := make(chan error, 1)
	go func() {
		done <- h.Build(func() error {
			appendLine(filepath.Join(root, "builds.log"), fmt.Sprintf("takeover %d", os.Getpid()))
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "data"), []byte("complete"), 0o644)
		})
	}()
	victim.Process.Signal(syscall.SIGKILL)
	victim.Wait()
	// The ceiling is generous: TTL + lock delay + slack is what it needs.
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("takeover Build = %v", err)
		}
	case <-time.After(10 * testTTL):
		t.Fatal("takeover did not complete")
	}
	if _, err := os.Stat(filepath.Join(h.OutputDirectory(), "partial")); err == nil {
		t.Fatal("the killed attempt's partial file was published")
	}
	if err := s.Verify(context.Background(), "killed"); err != nil {
		t.Fatal(err)
	}
	info, err := s.Inspect(context.Background(), "killed")
	if err != nil || info.Package.PID != os.Getpid() {
		t.Fatalf("published by pid %d (%v), want this process %d", info.Package.PID, err, os.Getpid())
	}
	if lines := buildLines(t, root); len(lines) != 2 {
		t.Fatalf("builds.log = %q, want the killed attempt and the takeover", lines)
	}
}

func waitFile(t *testing.T, path string) {
	t.Helper()
	// A child process cannot signal us through etcd before it has the
	// lock, so poll the file it writes; the ceiling only guards a hang.
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
	}
	t.Fatalf("%s never appeared", path)
}
