package node_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/internal/jobrun"
	"github.com/granary-build/granary/internal/thinrun"
	"github.com/granary-build/granary/node"
)

// Child processes are this test binary re-executed with childEnv set to a
// mode:
//
//   - "hold": connect to the node of $STATE, take a reference to $ID,
//     print "held" and wait to be killed;
//   - "granary-run": run granary-run (internal/thinrun, as the light
//     binary does) with --state-dir $STATE --root $ROOT $ID -- sh -c '...',
//     whose command prints "held" and sleeps;
//   - "node": run a node of etcd $ENDPOINT on $ROOT with state dir $STATE
//     (TTL $TTL seconds), print "ready" once it listens, and run until
//     killed.
const childEnv = "GRANARY_NODE_TEST_CHILD"

func childMain() int {
	ctx := context.Background()
	switch os.Getenv(childEnv) {
	case "hold":
		c, err := agent.ConnectWith(ctx, os.Getenv("STATE"), agent.Options{Purpose: "test holder"})
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		if err := c.Handle(os.Getenv("ID")).IncRefContext(ctx); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("held")
		select {}
	case "granary-run":
		err := thinrun.Main(ctx, []string{"--state-dir", os.Getenv("STATE"), "--root", os.Getenv("ROOT"), os.Getenv("ID"),
			"--", "sh", "-c", "echo held; exec sleep 1000"}, os.Stdin, os.Stdout, os.Stderr)
		var ee *jobrun.ExitErr
		if errors.As(err, &ee) {
			if ee.Err != nil {
				fmt.Fprintln(os.Stderr, ee.Err)
			}
			return ee.Code
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	case "builder":
		// Build $ID with a builder that starts `sleep` in a process group
		// of its own (holding fd 3, the parent's pipe), reports the group
		// and waits to be killed.
		c, err := agent.Connect(ctx, os.Getenv("STATE"))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		pipe := os.NewFile(3, "pipe")
		err = c.Handle(os.Getenv("ID")).BuildContext(ctx, func(bctx context.Context) error {
			cmd := exec.Command("sleep", "1000")
			cmd.ExtraFiles = []*os.File{pipe}
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := cmd.Start(); err != nil {
				return err
			}
			pipe.Close()
			if !agent.BuilderProcessGroup(bctx, cmd.Process.Pid) {
				return errors.New("not a builder context")
			}
			// A round trip after the report: the node has it.
			c.Handle(os.Getenv("ID")).TryRemoveContext(bctx) //nolint:errcheck
			fmt.Println("building")
			select {}
		})
		fmt.Fprintln(os.Stderr, err)
		return 1
	case "node":
		cfg := node.DefaultConfig()
		cfg.Endpoints = []string{os.Getenv("ENDPOINT")}
		cfg.Root = os.Getenv("ROOT")
		cfg.StateDir = os.Getenv("STATE")
		cfg.Name = "child-node"
		cfg.GCInterval = 0
		ttl, _ := time.ParseDuration(os.Getenv("TTL"))
		cfg.TTL = ttl
		n, err := node.New(ctx, cfg, nil)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println("ready")
		if err := n.Run(ctx); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		return 0
	}
	return 2
}

// startChild starts this test binary in mode with env and waits until it
// prints want. Cleanup kills it and its process group (a granary-run's
// command).
func startChild(t *testing.T, mode, want string, env ...string) *exec.Cmd {
	t.Helper()
	return startChildFiles(t, mode, want, nil, os.Stderr, env...)
}

// startChildFiles is startChild with extra files (fd 3 on) and the
// child's stderr.
func startChildFiles(t *testing.T, mode, want string, files []*os.File, stderr io.Writer, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.ExtraFiles = files
	cmd.Env = append(append(os.Environ(), childEnv+"="+mode), env...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != want {
		t.Fatalf("child %s printed %q (%v), want %q", mode, line, err, want)
	}
	go io.Copy(io.Discard, out)
	return cmd
}

// waitRefDeleted waits until a reference key of id is deleted after rev.
func waitRefDeleted(t *testing.T, cli *clientv3.Client, id string, rev int64, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	w := cli.Watch(ctx, etcdstore.DefaultPrefix+"ref/"+id+"/", clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range w {
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return
			}
		}
	}
	t.Fatalf("the reference to %s was not deleted within %v", id, within)
}

// holderKinds are the processes that hold a reference through the node:
// a library user (agent.Conn) and a job run by granary-run.
var holderKinds = []struct {
	name, mode, purpose string
}{
	{"conn", "hold", "test holder"},
	{"granary-run", "granary-run", "granary run sh"},
}

// A holder process killed with SIGKILL: the node sees its connection end
// and releases its reference at once (no linger here, so the host's etcd
// reference goes too, while the node's lease lives on).
func TestKilledHolderReleasesAtOnce(t *testing.T) {
	for _, k := range holderKinds {
		t.Run(k.name, func(t *testing.T) {
			srv := etcdtest.Start(t)
			root := t.TempDir()
			n, _ := agentNode(t, srv, root, "host-a", 0)
			cli := srv.Client(t)
			build(t, observer(t, srv, root), "held")

			child := startChild(t, k.mode, "held", "STATE="+n.Config().StateDir, "ROOT="+root, "ID=held")
			hs := n.Holders("held")
			if len(hs) != 1 || hs[0].PID != child.Process.Pid || hs[0].UID != os.Getuid() || hs[0].Purpose != k.purpose {
				t.Fatalf("holders = %+v, want the child (pid %d, uid %d, purpose %q)", hs, child.Process.Pid, os.Getuid(), k.purpose)
			}
			if got := etcdRefs(t, cli, "held"); got != 1 {
				t.Fatalf("etcd refs = %d, want 1", got)
			}
			rev := revision(t, cli)
			child.Process.Signal(syscall.SIGKILL)
			// The node's lease is alive and kept alive: only the node
			// releasing the reference can delete the key.
			waitRefDeleted(t, cli, "held", rev, 10*time.Second)
			if hs := n.Holders("held"); len(hs) != 0 {
				t.Errorf("holders after the kill = %+v, want none", hs)
			}
		})
	}
}

// A node killed with SIGKILL: its connections learn it at once (their
// reference in etcd is still there, on the dead node's lease), and the
// etcd reference goes after the TTL. A job run by granary-run is told too,
// and re-joins a node restarted on the same state directory: it holds its
// reference again there.
func TestKilledNodeTellsConns(t *testing.T) {
	for _, k := range holderKinds {
		t.Run(k.name, func(t *testing.T) {
			srv := etcdtest.Start(t)
			root := t.TempDir()
			state := shortDir(t)
			cli := srv.Client(t)
			build(t, observer(t, srv, root), "pkg")
			const ttl = 5 * time.Second
			nodeEnv := []string{"ENDPOINT=" + srv.Endpoint, "ROOT=" + root, "STATE=" + state, "TTL=" + ttl.String()}
			child := startChild(t, "node", "ready", nodeEnv...)

			var told func(within time.Duration) bool
			var c *agent.Conn
			var job *exec.Cmd
			stderr := &lineWatch{changed: make(chan struct{})}
			if k.mode == "hold" {
				var err error
				c, err = agent.Connect(context.Background(), state)
				if err != nil {
					t.Fatalf("Connect: %v", err)
				}
				defer c.Close()
				if err := c.Handle("pkg").IncRefContext(context.Background()); err != nil {
					t.Fatalf("IncRef: %v", err)
				}
				told = func(within time.Duration) bool {
					select {
					case <-c.Done():
						return true
					case <-time.After(within):
						return false
					}
				}
			} else {
				job = startChildFiles(t, k.mode, "held", nil, stderr, "STATE="+state, "ROOT="+root, "ID=pkg")
				told = func(within time.Duration) bool { return stderr.wait("the local node went away", within) }
			}
			rev := revision(t, cli)
			child.Process.Signal(syscall.SIGKILL)
			if !told(ttl) {
				t.Fatalf("the holder was not told within the TTL (%v) that its node died", ttl)
			}
			if got := etcdRefs(t, cli, "pkg"); got != 1 {
				t.Errorf("etcd refs when the holder learnt the node died = %d, want 1 (it learnt before the lease expired)", got)
			}
			if c != nil {
				if !errors.Is(c.Err(), agent.ErrNodeGone) {
					t.Errorf("Err = %v, want ErrNodeGone", c.Err())
				}
				n := <-c.Notices()
				for n.Kind != agent.NoticeNodeGone {
					n = <-c.Notices()
				}
			}
			waitRefDeleted(t, cli, "pkg", rev, 3*ttl)
			if job == nil {
				return
			}
			// The node comes back: the job takes its reference again.
			startChild(t, "node", "ready", nodeEnv...)
			if !stderr.wait("reconnected to the local node", jobrun.ReconnectWithin) {
				t.Fatal("the job did not reconnect to the restarted node")
			}
			oc, err := agent.Connect(context.Background(), state)
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			defer oc.Close()
			_, hs, err := oc.Inspect(context.Background(), "pkg")
			if err != nil || len(hs) != 1 || hs[0].PID != job.Process.Pid {
				t.Fatalf("holders on the restarted node = %+v (%v), want the job (pid %d)", hs, err, job.Process.Pid)
			}
			if got := etcdRefs(t, cli, "pkg"); got != 1 {
				t.Errorf("etcd refs after the job re-joined = %d, want 1 (the restarted node's)", got)
			}
		})
	}
}

// lineWatch is a child's stderr: it copies it to the test's and lets the
// test wait until it contains a string.
type lineWatch struct {
	mu      sync.Mutex
	buf     strings.Builder
	changed chan struct{} // closed and replaced at each write
}

func (w *lineWatch) Write(p []byte) (int, error) {
	os.Stderr.Write(p)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	close(w.changed)
	w.changed = make(chan struct{})
	return len(p), nil
}

// wait reports whether the output contains s within the given time.
func (w *lineWatch) wait(s string, within time.Duration) bool {
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		found, changed := strings.Contains(w.buf.String(), s), w.changed
		w.mu.Unlock()
		if found {
			return true
		}
		select {
		case <-changed:
		case <-deadline.C:
			return false
		}
	}
}

// A caller killed with SIGKILL mid-build: the node abandons the attempt at
// once, kills the builder's process group the caller reported, and a
// later build runs afresh.
func TestKilledBuilderCallerAbandons(t *testing.T) {
	srv := etcdtest.Start(t)
	n, _ := agentNode(t, srv, t.TempDir(), "host-a", node.DefaultLinger)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	child := startChildFiles(t, "builder", "building", []*os.File{w}, os.Stderr, "STATE="+n.Config().StateDir, "ID=orphan")
	w.Close()
	child.Process.Signal(syscall.SIGKILL)
	// EOF once every holder of the pipe's write end is dead: the child and
	// its builder's `sleep 1000`, which only the node can have killed.
	done := make(chan error, 1)
	go func() { _, err := io.ReadAll(r); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the builder's process group outlived its killed caller")
	}
	c := connect(t, n)
	ran := false
	h := c.Handle("orphan")
	if err := h.BuildContext(context.Background(), func(ctx context.Context) error {
		ran = true
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("x"), 0o644)
	}); err != nil || !ran {
		t.Fatalf("Build after the killed caller = %v (ran %v), want a fresh successful attempt", err, ran)
	}
}

// A node killed mid-build leaves its build record, lock and references on
// its lease until the TTL (which an etcd leader election starts over).
// The node started next on the same state directory holds the directory's
// lock, so the old one is dead: before it serves, it deletes the dead
// node's build records and locks, so another host's build of the package
// need not wait; the references stay until the TTL (their jobs are
// reconnecting and take them again).
func TestRestartedNodeEndsPreviousRun(t *testing.T) {
	srv := etcdtest.Start(t)
	root, state := t.TempDir(), shortDir(t)
	cli := srv.Client(t)
	build(t, observer(t, srv, root), "held")
	nodeEnv := []string{"ENDPOINT=" + srv.Endpoint, "ROOT=" + root, "STATE=" + state, "TTL=60s"}
	child := startChild(t, "node", "ready", nodeEnv...)
	c, err := agent.Connect(context.Background(), state)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Close()
	if err := c.Handle("held").IncRefContext(context.Background()); err != nil {
		t.Fatalf("IncRef: %v", err)
	}
	started := make(chan struct{})
	go c.Handle("p").BuildContext(context.Background(), func(ctx context.Context) error { //nolint:errcheck // ends with the node
		close(started)
		<-ctx.Done()
		return ctx.Err()
	})
	<-started
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	startChild(t, "node", "ready", nodeEnv...)
	for _, k := range []string{"build/p", "lock/p/"} {
		if got := keyCount(t, cli, etcdstore.DefaultPrefix+k); got != 0 {
			t.Errorf("keys %s after the restart = %d, want 0", k, got)
		}
	}
	if got := etcdRefs(t, cli, "held"); got != 1 {
		t.Errorf("references on held after the restart = %d, want 1 (the dead node's, kept for its reconnecting job)", got)
	}
	if ok, err := observer(t, srv, root).Handle("p").TryRemove(); ok || !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("TryRemove(p) = %v, %v: want ErrPackageNotExist (no attempt left running)", ok, err)
	}
}

// keyCount is how many keys start with prefix.
func keyCount(t *testing.T, cli *clientv3.Client, prefix string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}
