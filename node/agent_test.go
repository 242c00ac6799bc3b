package node_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/core/coretest"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// shortDir is a directory with a short path (unix socket paths are
// limited), removed at the end.
func shortDir(t *testing.T) string {
	t.Helper()
	return shortDirTB(t)
}

func shortDirTB(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ga")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// agentNode runs a node of srv on root with its own short state directory
// and the given linger.
func agentNode(t *testing.T, srv *etcdtest.Server, root, name string, linger time.Duration) (*node.Node, func() error) {
	t.Helper()
	cfg := testConfig(t, srv, root)
	cfg.StateDir = shortDir(t)
	cfg.Name = name
	cfg.Linger = linger
	return startNode(t, cfg)
}

func connect(t *testing.T, n *node.Node) *agent.Conn {
	t.Helper()
	c, err := agent.Connect(context.Background(), n.Config().StateDir)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestConnConformance(t *testing.T) {
	// Every manager a Conn of one node, with the default linger: local
	// callers share the host's references and one flight per package.
	t.Run("OneNode", func(t *testing.T) {
		coretest.TestPackageManager(t, func(t *testing.T, n int) []core.PackageManager {
			srv := etcdtest.Start(t)
			nd, _ := agentNode(t, srv, t.TempDir(), "host-a", node.DefaultLinger)
			pms := make([]core.PackageManager, n)
			for i := range pms {
				pms[i] = curatedConn{connect(t, nd)}
			}
			return pms
		})
	})
	// Every manager a Conn of its own node, the nodes sharing one etcd and
	// one root, as hosts do, with the default linger: the suite removes
	// from one host right after a DecRef on another, which asks the other
	// node to let its lingering reference go.
	t.Run("NodePerManager", func(t *testing.T) {
		coretest.TestPackageManager(t, func(t *testing.T, n int) []core.PackageManager {
			srv := etcdtest.Start(t)
			root := t.TempDir()
			pms := make([]core.PackageManager, n)
			for i := range pms {
				nd, _ := agentNode(t, srv, root, "host-"+string(rune('a'+i)), node.DefaultLinger)
				pms[i] = curatedConn{connect(t, nd)}
			}
			return pms
		})
	})
}

// etcdRefs counts the etcd reference keys of id.
func etcdRefs(t *testing.T, cli *clientv3.Client, id string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, etcdstore.DefaultPrefix+"ref/"+id+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

func revision(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

func TestHostAggregatesRefs(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	// A long linger: this test releases it by removal, never by the clock.
	n, _ := agentNode(t, srv, root, "host-a", time.Hour)
	cli := srv.Client(t)
	obs := observer(t, srv, root)
	build(t, obs, "agg")

	conns := []*agent.Conn{connect(t, n), connect(t, n), connect(t, n)}
	if err := conns[0].Handle("agg").IncRefContext(context.Background()); err != nil {
		t.Fatalf("first IncRef: %v", err)
	}
	rev := revision(t, cli)
	for _, c := range conns {
		for range 5 {
			if err := c.Handle("agg").IncRefContext(context.Background()); err != nil {
				t.Fatalf("IncRef: %v", err)
			}
		}
	}
	if got := revision(t, cli); got != rev {
		t.Errorf("etcd revision moved from %d to %d for IncRefs on a package the host holds; want no writes", rev, got)
	}
	if got := etcdRefs(t, cli, "agg"); got != 1 {
		t.Errorf("etcd refs = %d with 16 local holders, want 1 (the host's)", got)
	}
	holders := n.Holders("agg")
	if len(holders) != 16 || holders[0].PID != os.Getpid() || holders[0].UID != os.Getuid() {
		t.Errorf("Holders = %d entries (first %+v), want 16 of pid %d uid %d", len(holders), holders[0], os.Getpid(), os.Getuid())
	}
	_, hs, err := conns[1].Inspect(context.Background(), "agg")
	if err != nil || len(hs) != 16 {
		t.Errorf("Conn.Inspect holders = %d, %v; want 16", len(hs), err)
	}

	// Another host cannot remove it while this host holds it.
	if ok, err := obs.Handle("agg").TryRemoveContext(context.Background()); ok || err != nil {
		t.Fatalf("TryRemove from another host while held = %v, %v; want false, nil", ok, err)
	}
	// Closing a connection drops its references at once, and only its.
	conns[0].Close()
	conns[1].Close()
	if got := len(n.Holders("agg")); got != 5 {
		t.Errorf("holders after two Conns closed = %d, want 5", got)
	}
	h := conns[2].Handle("agg")
	if ok, err := h.TryRemoveContext(context.Background()); ok || err != nil {
		t.Fatalf("TryRemove through the node with local holders = %v, %v; want false, nil", ok, err)
	}
	for range 5 {
		if err := h.DecRefContext(context.Background()); err != nil {
			t.Fatalf("DecRef: %v", err)
		}
	}
	if err := h.DecRefContext(context.Background()); !errors.Is(err, etcdstore.ErrNoRef) {
		t.Errorf("DecRef without a reference = %v, want ErrNoRef", err)
	}
	// The last local holder is gone; the host's reference lingers.
	if got := etcdRefs(t, cli, "agg"); got != 1 {
		t.Errorf("etcd refs during the linger = %d, want 1", got)
	}
	// A remover that does not ask lingering hosts to let go (no yield
	// wait) finds it in use.
	impatient := observer(t, srv, root, etcdstore.WithYieldWait(0))
	if ok, err := impatient.Handle("agg").TryRemoveContext(context.Background()); ok || err != nil {
		t.Fatalf("TryRemove from another host without a yield wait during the linger = %v, %v; want false, nil", ok, err)
	}
	// Removal through the node lets the lingering reference go first.
	if ok, err := h.TryRemoveContext(context.Background()); !ok || err != nil {
		t.Fatalf("TryRemove through the node during the linger = %v, %v; want true, nil", ok, err)
	}
	if err := h.IncRefContext(context.Background()); !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("IncRef after removal = %v, want ErrPackageNotExist", err)
	}
}

func TestLingerReleases(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	n, _ := agentNode(t, srv, root, "host-a", 50*time.Millisecond)
	cli := srv.Client(t)
	// It does not ask the node to let go: only the linger can release.
	obs := observer(t, srv, root, etcdstore.WithYieldWait(0))
	build(t, obs, "ling")
	c := connect(t, n)
	h := c.Handle("ling")
	if err := h.IncRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	rev := revision(t, cli)
	w := cli.Watch(context.Background(), etcdstore.DefaultPrefix+"ref/ling/", clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	if err := h.DecRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The host's reference goes after the linger: wait for its deletion.
	for resp := range w {
		if len(resp.Events) > 0 && resp.Events[0].Type == clientv3.EventTypeDelete {
			break
		}
	}
	if ok, err := obs.Handle("ling").TryRemoveContext(context.Background()); !ok || err != nil {
		t.Fatalf("TryRemove from another host after the linger = %v, %v; want true, nil", ok, err)
	}
}

func TestBuildThroughNode(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	n, _ := agentNode(t, srv, root, "host-a", node.DefaultLinger)
	c1, c2 := connect(t, n), connect(t, n)

	// c1's builder blocks until released; c2 asks meanwhile and shares the
	// attempt (one flight per host): its own builder never runs.
	started := make(chan struct{})
	release := make(chan struct{})
	res1 := make(chan error, 1)
	go func() {
		h := c1.Handle("b1")
		res1 <- h.BuildContext(context.Background(), func(ctx context.Context) error {
			close(started)
			<-release
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("x"), 0o644)
		})
	}()
	<-started
	res2 := make(chan error, 1)
	ran2 := false
	go func() {
		res2 <- c2.Handle("b1").BuildContext(context.Background(), func(ctx context.Context) error { ran2 = true; return nil })
	}()
	close(release)
	if err := <-res1; err != nil {
		t.Fatalf("Build 1: %v", err)
	}
	if err := <-res2; err != nil {
		t.Fatalf("Build 2: %v", err)
	}
	if ran2 {
		t.Errorf("the second caller's builder ran; want one attempt per host")
	}

	// A caller that goes away mid-build abandons the attempt; another
	// caller waiting on it then builds with its own builder.
	c3, c4 := connect(t, n), connect(t, n)
	started = make(chan struct{})
	res3 := make(chan error, 1)
	go func() {
		res3 <- c3.Handle("b2").BuildContext(context.Background(), func(ctx context.Context) error {
			close(started)
			<-ctx.Done() // stopped when the connection ends
			return ctx.Err()
		})
	}()
	<-started
	res4 := make(chan error, 1)
	go func() {
		h := c4.Handle("b2")
		res4 <- h.BuildContext(context.Background(), func(ctx context.Context) error {
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "g"), []byte("y"), 0o644)
		})
	}()
	// Wait until c4's request joined the flight: its Build would
	// otherwise start after c3's end and simply build. Either way it must
	// succeed; the attempt of c3 must not publish.
	c3.Close()
	if err := <-res3; !errors.Is(err, agent.ErrNodeGone) {
		t.Errorf("Build on a closed Conn = %v, want ErrNodeGone", err)
	}
	if err := <-res4; err != nil {
		t.Fatalf("Build after the builder's process went away = %v, want nil (built by c4)", err)
	}
	if _, err := os.Stat(filepath.Join(c4.Handle("b2").OutputDirectory(), "g")); err != nil {
		t.Errorf("c4's output missing: %v", err)
	}
}

func TestNodeStopTellsConns(t *testing.T) {
	srv := etcdtest.Start(t)
	n, stop := agentNode(t, srv, t.TempDir(), "host-a", node.DefaultLinger)
	c := connect(t, n)
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Conn not told that the node stopped")
	}
	if !errors.Is(c.Err(), agent.ErrNodeGone) {
		t.Errorf("Err = %v, want ErrNodeGone", c.Err())
	}
	if err := c.Handle("x").IncRef(); !errors.Is(err, agent.ErrNodeGone) {
		t.Errorf("IncRef after the node stopped = %v, want ErrNodeGone", err)
	}
	if _, err := agent.Connect(context.Background(), n.Config().StateDir); !errors.Is(err, node.ErrNoLocalNode) {
		t.Errorf("Connect to a stopped node = %v, want ErrNoLocalNode", err)
	}
}

// Two nodes on one etcd and root: neither removes a package that a job on
// either holds, with or without the linger, and either may remove it once
// nobody holds it.
func TestTwoNodesNeverRemoveHeld(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	na, _ := agentNode(t, srv, root, "host-a", time.Hour)
	nb, _ := agentNode(t, srv, root, "host-b", 0)
	ca, cb := connect(t, na), connect(t, nb)
	for _, id := range []string{"p1", "p2"} {
		h := ca.Handle(id)
		if err := h.BuildContext(context.Background(), func(context.Context) error {
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id), 0o644)
		}); err != nil {
			t.Fatal(err)
		}
	}
	// A job on host a holds p1, a job on host b holds p2.
	if err := ca.Handle("p1").IncRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := cb.Handle("p2").IncRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		c    *agent.Conn
		id   string
	}{{"b removes a's", cb, "p1"}, {"a removes b's", ca, "p2"}, {"a removes its own", ca, "p1"}, {"b removes its own", cb, "p2"}} {
		if ok, err := tc.c.Handle(tc.id).TryRemoveContext(context.Background()); ok || err != nil {
			t.Errorf("%s: TryRemove = %v, %v; want false, nil", tc.name, ok, err)
		}
	}
	// Host a's job ends: its reference lingers (an hour) as a cache for
	// host a's next job. Host b's removal asks host a to let it go, and
	// removes p1; host a's next job finds it gone. Host b's job ends: host a
	// removes p2 (host b's own lingering reference goes the same way).
	if err := ca.Handle("p1").DecRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := cb.Handle("p2").DecRefContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ok, err := cb.Handle("p1").TryRemoveContext(context.Background()); !ok || err != nil {
		t.Errorf("host b removing p1 that host a only lingers on = %v, %v; want true, nil", ok, err)
	}
	if err := ca.Handle("p1").IncRefContext(context.Background()); !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("host a's IncRef of the removed p1 = %v; want ErrPackageNotExist", err)
	}
	if ok, err := ca.Handle("p2").TryRemoveContext(context.Background()); !ok || err != nil {
		t.Errorf("host a removing p2 nobody holds = %v, %v; want true, nil", ok, err)
	}
}

// A removal asks lingering hosts to let go, but a reference that a job
// holds (through a node, or a process's own) keeps the package, and a
// job that comes back to a lingering host keeps it too.
func TestYieldKeepsHeld(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	na, _ := agentNode(t, srv, root, "host-a", time.Hour)
	nb, _ := agentNode(t, srv, root, "host-b", time.Hour)
	ca, cb := connect(t, na), connect(t, nb)
	// The observer would wait an hour for a node that ignored its yield
	// request: host a's refusal (its holder count) must end the wait.
	obs := observer(t, srv, root, etcdstore.WithYieldWait(time.Hour))
	build(t, obs, "y")
	ctx := context.Background()
	// Both hosts linger on y; a process on a third host holds it.
	for _, c := range []*agent.Conn{ca, cb} {
		if err := c.Handle("y").IncRefContext(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.Handle("y").DecRefContext(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := obs.Handle("y").IncRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	if ok, err := cb.Handle("y").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove while a process holds y = %v, %v; want false, nil", ok, err)
	}
	// Not asked: host a still lingers on it (and host b, through which
	// the removal went, let its own go first).
	if got := etcdRefs(t, cli, "y"); got != 2 {
		t.Errorf("etcd references after the refused removal = %d; want 2 (the process's, host a's)", got)
	}
	if err := obs.Handle("y").DecRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	// A job on host a holds it again: asked, host a keeps it.
	if err := ca.Handle("y").IncRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	refused := make(chan error, 1)
	go func() {
		ok, err := obs.Handle("y").TryRemoveContext(ctx)
		if ok && err == nil {
			err = errors.New("removed")
		}
		refused <- err
	}()
	select {
	case err := <-refused:
		if err != nil {
			t.Fatalf("TryRemove while a job on host a holds y: %v; want false, nil", err)
		}
	case <-time.After(time.Minute): // a hang detector, far above any answer
		t.Fatal("TryRemove while a job on host a holds y is still waiting its hour-long yield wait: host a did not refuse")
	}
	if got := etcdRefs(t, cli, "y"); got != 1 {
		t.Errorf("etcd references after the refused removal = %d; want 1 (host a's)", got)
	}
	// The job ends; now host a lets go when asked.
	if err := ca.Handle("y").DecRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	if ok, err := obs.Handle("y").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove with only host a lingering = %v, %v; want true, nil", ok, err)
	}
}

// The node's lease is revoked behind its back and the package removed
// before the node notices: the node takes its references again, finds the
// package gone, and tells the connection holding it; the connection also
// hears of the lease loss.
func TestRefLostReachesConn(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cfg := testConfig(t, srv, root)
	cfg.StateDir = shortDir(t)
	cfg.TTL = 3 * time.Second
	// The node hears of its deleted keys at once now and takes its
	// references again: hold that back until the removal is done, so the
	// package is gone when it tries (the order this test is about; the
	// other is TestRevokedLeaseNeverHandsOutRemoved's).
	gate := make(chan struct{})
	openGate := sync.OnceFunc(func() { close(gate) })
	cfg.Events = func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventRefDeleted {
			<-gate
		}
	}
	n, _ := startNode(t, cfg)
	t.Cleanup(openGate)
	obs := observer(t, srv, root)
	build(t, obs, "stolen")
	build(t, obs, "kept")
	c := connect(t, n)
	for _, id := range []string{"stolen", "kept"} {
		if err := c.Handle(id).IncRefContext(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	cli := srv.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := cli.Revoke(ctx, n.Store().Lease()); err != nil {
		t.Fatalf("revoke the node's lease: %v", err)
	}
	if ok, err := obs.Handle("stolen").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove after the revocation = %v, %v; want true, nil", ok, err)
	}
	openGate()
	// Both notices come, in either order: the node pushes each from its
	// own goroutine.
	var sawLeaseLost, sawRefLost bool
	timeout := time.After(30 * time.Second)
	for !sawLeaseLost || !sawRefLost {
		select {
		case nt := <-c.Notices():
			switch nt.Kind {
			case agent.NoticeLeaseLost:
				sawLeaseLost = true
			case agent.NoticeRefLost:
				if nt.ID != "stolen" {
					t.Fatalf("ref lost for %q, want stolen", nt.ID)
				}
				sawRefLost = true
			case agent.NoticeNodeGone:
				t.Fatalf("connection ended: %v", nt.Err)
			}
		case <-timeout:
			t.Fatalf("within 30 s: lease loss reported %v, ref lost reported %v; want both", sawLeaseLost, sawRefLost)
		}
	}
	// The kept package's reference comes back on the new lease.
	waitRefs(t, cli, "kept", 1)
}

// A job starting on a lingering host races a removal from another host
// that asks the host to yield: either the job gets the package and the
// removal is refused, or the removal wins and the job is told the package
// does not exist; never both.
func TestYieldRacesIncRef(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	na, _ := agentNode(t, srv, root, "host-a", time.Hour)
	ca := connect(t, na)
	// A short yield wait: a refused removal waits it out.
	obs := observer(t, srv, root, etcdstore.WithYieldWait(300*time.Millisecond))
	ctx := context.Background()
	won := map[string]int{}
	// At least 20 rounds, then on until both have won (at most 80 rounds):
	// a race test that never saw one of the orders has not tested it.
	for i := 0; i < 80 && (i < 20 || won["job"] == 0 || won["removal"] == 0); i++ {
		id := fmt.Sprintf("race-%d", i)
		build(t, obs, id)
		h := ca.Handle(id)
		if err := h.IncRefContext(ctx); err != nil {
			t.Fatal(err)
		}
		if err := h.DecRefContext(ctx); err != nil { // lingering now
			t.Fatal(err)
		}
		var (
			wg      sync.WaitGroup
			incErr  error
			removed bool
			rmErr   error
		)
		wg.Go(func() {
			// Start at a different point of the removal each time
			// (its lock, its request, the node's release, its Txn).
			time.Sleep(time.Duration(i%20) * 3 * time.Millisecond)
			incErr = h.IncRefContext(ctx)
		})
		wg.Go(func() { removed, rmErr = obs.Handle(id).TryRemoveContext(ctx) })
		wg.Wait()
		switch {
		case rmErr != nil:
			t.Fatalf("%s: TryRemove: %v", id, rmErr)
		case incErr == nil && removed:
			t.Fatalf("%s: the job holds the package and the removal succeeded", id)
		case incErr == nil:
			won["job"]++
			if _, err := os.Stat(h.OutputDirectory()); err != nil {
				t.Fatalf("%s: held package's tree: %v", id, err)
			}
			if err := h.DecRefContext(ctx); err != nil {
				t.Fatal(err)
			}
		case !removed || !errors.Is(incErr, core.ErrPackageNotExist):
			t.Fatalf("%s: IncRef = %v, TryRemove = %v; want one of them to win", id, incErr, removed)
		default:
			won["removal"]++
		}
	}
	t.Logf("winners: %v", won)
	if won["job"] == 0 || won["removal"] == 0 {
		t.Errorf("winners %v: both the job and the removal must win at least once for the race to be tested", won)
	}
}

// Inspect from another host asks the node for its local holder count,
// which the node writes into its reference: 3 jobs, then none (lingering).
func TestInspectCountsOtherHostsHolders(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	na, _ := agentNode(t, srv, root, "host-a", time.Hour)
	nb, _ := agentNode(t, srv, root, "host-b", time.Hour)
	obs := observer(t, srv, root)
	build(t, obs, "n")
	ctx := context.Background()
	jobs := []*agent.Conn{connect(t, na), connect(t, na), connect(t, na)}
	for _, c := range jobs {
		if err := c.Handle("n").IncRefContext(ctx); err != nil {
			t.Fatal(err)
		}
	}
	count := func(want int, via string, info etcdstore.Info) {
		t.Helper()
		if len(info.Refs) != 1 || info.Refs[0].Host != "host-a" || !info.Refs[0].Cached {
			t.Fatalf("%s: refs = %+v; want host-a's cached reference", via, info.Refs)
		}
		if r := info.Refs[0]; r.HoldersAt.IsZero() || r.Holders != want {
			t.Errorf("%s: host-a's holders = %d at %v; want %d, answered", via, r.Holders, r.HoldersAt, want)
		}
	}
	// The node asks for at most etcdstore.DefaultHoldersWait (a second): on
	// a loaded machine host-a may answer later, and the inspection then
	// shows no count, as designed; ask again a few times before failing.
	cb := connect(t, nb)
	var winfo agent.Info
	for try := 0; ; try++ {
		var err error
		if winfo, _, err = cb.Inspect(ctx, "n"); err != nil {
			t.Fatal(err)
		}
		if rs := node.StoreInfo(winfo).Refs; try == 4 || len(rs) != 1 || !rs[0].HoldersAt.IsZero() {
			break
		}
	}
	count(3, "through host-b's node", node.StoreInfo(winfo))
	for _, c := range jobs {
		if err := c.Handle("n").DecRefContext(ctx); err != nil {
			t.Fatal(err)
		}
	}
	info, err := obs.AskHolders(ctx, "n", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	count(0, "from a process's store", info)
}

// An IncRef whose caller gave up before the node answered (here: it waited
// for a build that outlasted its context) is given back when the node
// grants it: the node lists no holder for it, and the Conn does not count
// it. (agentwire's client forgot such a reference; it pinned the package
// until the connection ended.)
func TestIncRefGrantedAfterCallerGaveUpIsGivenBack(t *testing.T) {
	srv := etcdtest.Start(t)
	n, _ := agentNode(t, srv, t.TempDir(), "host-a", time.Hour)
	release := make(chan struct{})
	started := make(chan struct{})
	built := make(chan error, 1)
	go func() {
		_, err := n.Build(context.Background(), "slow", func(context.Context) error {
			close(started)
			<-release
			return nil
		})
		built <- err
	}()
	<-started
	c := connect(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := c.Handle("slow").IncRefContext(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("IncRef during the build, with a short context = %v, want DeadlineExceeded", err)
	}
	close(release)
	if err := <-built; err != nil {
		t.Fatal(err)
	}
	// The node grants the waiting IncRef once the build published (the
	// host then holds its etcd reference) and the Conn gives it back at
	// once: without that, the connection would hold it for good. Wait
	// (bounded) for the grant, then for no holder well after it (the
	// grant's own microseconds between the etcd reference and the local
	// one do not count).
	deadline := time.Now().Add(10 * time.Second)
	var granted time.Time
	for granted.IsZero() || len(n.Holders("slow")) > 0 || time.Since(granted) < 200*time.Millisecond {
		if granted.IsZero() && n.Store().RefProven("slow") {
			granted = time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("holders of slow = %+v (granted %v); want none: the late IncRef given back", n.Holders("slow"), !granted.IsZero())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.Handle("slow").DecRefContext(context.Background()); !errors.Is(err, core.ErrNoRef) {
		t.Errorf("DecRef of the given-back reference = %v, want ErrNoRef", err)
	}
}
