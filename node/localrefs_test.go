package node_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// localAPI serves a LocalAPI for a store of its own on srv and root, with
// the given linger.
func localAPI(t *testing.T, srv *etcdtest.Server, root string, linger time.Duration) (*node.LocalAPI, string) {
	t.Helper()
	s, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithHost("host-a"))
	if err != nil {
		t.Fatalf("etcdstore.New: %v", err)
	}
	cfg := node.DefaultConfig()
	cfg.StateDir, cfg.Root, cfg.Name, cfg.Linger = shortDir(t), root, "host-a", linger
	api, err := node.NewLocalAPI(s, cfg, nil)
	if err != nil {
		t.Fatalf("NewLocalAPI: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		s.Close()
	})
	return api, cfg.StateDir
}

// TestLocalRefsShareHostRef: in-process references and a Conn's share the
// host's one etcd reference; only the first costs etcd a write, and a
// removal from another host fails while any of them holds it.
func TestLocalRefsShareHostRef(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	obs := observer(t, srv, root)
	build(t, obs, "lr")
	api, state := localAPI(t, srv, root, time.Hour)
	ctx := context.Background()

	refs := api.LocalRefs()
	if err := refs.IncRef(ctx, "lr"); err != nil {
		t.Fatalf("IncRef: %v", err)
	}
	rev := revision(t, cli)
	if err := refs.IncRef(ctx, "lr"); err != nil {
		t.Fatalf("second IncRef: %v", err)
	}
	c, err := agent.Connect(ctx, state)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Close()
	if err := c.Handle("lr").IncRefContext(ctx); err != nil {
		t.Fatalf("Conn IncRef: %v", err)
	}
	if got := revision(t, cli); got != rev {
		t.Errorf("warm IncRefs moved etcd's revision from %d to %d, want no write", rev, got)
	}
	if got := etcdRefs(t, cli, "lr"); got != 1 {
		t.Errorf("%d etcd references to lr, want the host's one", got)
	}
	if got := len(api.Holders("lr")); got != 1 {
		t.Errorf("Holders lists %d references, want the Conn's one (in-process ones are not listed)", got)
	}
	if err := c.Handle("lr").DecRefContext(ctx); err != nil {
		t.Fatalf("Conn DecRef: %v", err)
	}
	if ok, err := obs.Handle("lr").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove from another host while in-process references are held = %v, %v; want false, nil", ok, err)
	}
	if err := refs.DecRef("lr"); err != nil {
		t.Fatalf("DecRef: %v", err)
	}
	if err := refs.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := refs.DecRef("lr"); !errors.Is(err, etcdstore.ErrNoRef) {
		t.Errorf("DecRef after Close = %v, want ErrNoRef", err)
	}
	if err := refs.IncRef(ctx, "lr"); !errors.Is(err, agent.ErrNodeGone) {
		t.Errorf("IncRef after Close = %v, want ErrNodeGone", err)
	}
}

// TestLocalRefsNoLinger: without a linger, the last DecRef releases the
// host's etcd reference before it returns; errors are checkable.
func TestLocalRefsNoLinger(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	obs := observer(t, srv, root)
	build(t, obs, "lr")
	api, _ := localAPI(t, srv, root, 0)
	ctx := context.Background()

	refs := api.LocalRefs()
	defer refs.Close()
	if err := refs.IncRef(ctx, "missing"); !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("IncRef of a missing package = %v, want ErrPackageNotExist", err)
	}
	if err := refs.DecRef("lr"); !errors.Is(err, etcdstore.ErrNoRef) {
		t.Errorf("DecRef without a reference = %v, want ErrNoRef", err)
	}
	for range 2 {
		if err := refs.IncRef(ctx, "lr"); err != nil {
			t.Fatalf("IncRef: %v", err)
		}
	}
	if err := refs.DecRef("lr"); err != nil {
		t.Fatalf("DecRef: %v", err)
	}
	if got := etcdRefs(t, cli, "lr"); got != 1 {
		t.Errorf("%d etcd references with one local holder left, want 1", got)
	}
	if err := refs.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := etcdRefs(t, cli, "lr"); got != 0 {
		t.Errorf("%d etcd references after Close without a linger, want 0", got)
	}
	if ok, err := obs.Handle("lr").TryRemoveContext(ctx); !ok || err != nil {
		t.Errorf("TryRemove after Close = %v, %v; want true, nil", ok, err)
	}
}
