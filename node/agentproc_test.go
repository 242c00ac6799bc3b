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
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// Child processes are this test binary re-executed with childEnv set to a
// mode:
//
//   - "hold": connect to the node of $STATE, take a reference to $ID,
//     print "held" and wait to be killed;
//   - "node": run a node of etcd $ENDPOINT on $ROOT with state dir $STATE
//     (TTL $TTL seconds), print "ready" once it listens, and run until
//     killed.
const childEnv = "GRANARY_NODE_TEST_CHILD"

func childMain() int {
	ctx := context.Background()
	switch os.Getenv(childEnv) {
	case "hold":
		c, err := node.ConnectWith(ctx, os.Getenv("STATE"), node.ConnectOptions{Purpose: "test holder"})
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
	case "builder":
		// Build $ID with a builder that starts `sleep` in a process group
		// of its own (holding fd 3, the parent's pipe), reports the group
		// and waits to be killed.
		c, err := node.Connect(ctx, os.Getenv("STATE"))
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
			if !node.BuilderProcessGroup(bctx, cmd.Process.Pid) {
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
// prints want. Cleanup kills it.
func startChild(t *testing.T, mode, want string, env ...string) *exec.Cmd {
	t.Helper()
	return startChildFiles(t, mode, want, nil, env...)
}

// startChildFiles is startChild with extra files (fd 3 on).
func startChildFiles(t *testing.T, mode, want string, files []*os.File, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.ExtraFiles = files
	cmd.Env = append(append(os.Environ(), childEnv+"="+mode), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
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

// A holder process killed with SIGKILL: the node sees its connection end
// and releases its reference at once (no linger here, so the host's etcd
// reference goes too, while the node's lease lives on).
func TestKilledHolderReleasesAtOnce(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	n, _ := agentNode(t, srv, root, "host-a", 0)
	cli := srv.Client(t)
	build(t, observer(t, srv, root), "held")

	child := startChild(t, "hold", "held", "STATE="+n.Config().StateDir, "ID=held")
	hs := n.Holders("held")
	if len(hs) != 1 || hs[0].PID != child.Process.Pid || hs[0].UID != os.Getuid() || hs[0].Purpose != "test holder" {
		t.Fatalf("holders = %+v, want the child (pid %d, uid %d, purpose %q)", hs, child.Process.Pid, os.Getuid(), "test holder")
	}
	if got := etcdRefs(t, cli, "held"); got != 1 {
		t.Fatalf("etcd refs = %d, want 1", got)
	}
	rev := revision(t, cli)
	child.Process.Signal(syscall.SIGKILL)
	// The node's lease is alive and kept alive: only the node releasing the
	// reference can delete the key.
	waitRefDeleted(t, cli, "held", rev, 10*time.Second)
	if hs := n.Holders("held"); len(hs) != 0 {
		t.Errorf("holders after the kill = %+v, want none", hs)
	}
}

// A node killed with SIGKILL: its connections learn it at once (their
// reference in etcd is still there, on the dead node's lease), and the
// etcd reference goes after the TTL.
func TestKilledNodeTellsConns(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	state := shortDir(t)
	cli := srv.Client(t)
	build(t, observer(t, srv, root), "pkg")
	const ttl = 5 * time.Second
	child := startChild(t, "node", "ready", "ENDPOINT="+srv.Endpoint, "ROOT="+root, "STATE="+state, "TTL="+ttl.String())

	c, err := node.Connect(context.Background(), state)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Close()
	if err := c.Handle("pkg").IncRefContext(context.Background()); err != nil {
		t.Fatalf("IncRef: %v", err)
	}
	rev := revision(t, cli)
	child.Process.Signal(syscall.SIGKILL)
	select {
	case <-c.Done():
	case <-time.After(ttl):
		t.Fatalf("the Conn was not told within the TTL (%v) that its node died", ttl)
	}
	if got := etcdRefs(t, cli, "pkg"); got != 1 {
		t.Errorf("etcd refs when the Conn learnt the node died = %d, want 1 (it learnt before the lease expired)", got)
	}
	if !errors.Is(c.Err(), node.ErrNodeGone) {
		t.Errorf("Err = %v, want ErrNodeGone", c.Err())
	}
	n := <-c.Notices()
	for n.Kind != node.NoticeNodeGone {
		n = <-c.Notices()
	}
	waitRefDeleted(t, cli, "pkg", rev, 3*ttl)
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
	child := startChildFiles(t, "builder", "building", []*os.File{w}, "STATE="+n.Config().StateDir, "ID=orphan")
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
