package etcdstore_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// A cached reference is released at a removal's request by its owner
// (here the event hook, as a node does when no job holds the package), so
// the removal succeeds; a plain reference is not asked and keeps the
// package; the cached reference's release records the access time.
func TestYieldReleasesCachedRefs(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	var owner *etcdstore.Store
	asked := make(chan string, 4)
	owner = newStore(t, srv, root, etcdstore.WithHost("owner"), etcdstore.WithEvents(func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventYieldRequested {
			asked <- e.ID + " by " + e.Host
			go owner.Handle(e.ID).DecRef() //nolint:errcheck // checked by the removal's outcome
		}
	}))
	remover := newStore(t, srv, root, etcdstore.WithHost("remover"))
	ctx := context.Background()
	build(t, owner, "c")
	build(t, owner, "p")

	// A plain reference: refused without asking anyone.
	if err := owner.Handle("p").IncRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	if ok, err := remover.Handle("p").TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemove with a plain reference = %v, %v; want false, nil", ok, err)
	}

	// A cached reference: asked for, released, removed.
	if err := owner.Handle("c").IncRefCachedContext(ctx); err != nil {
		t.Fatal(err)
	}
	atime := func() int64 {
		resp, err := cli.Get(ctx, etcdstore.DefaultPrefix+"atime/c")
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("atime of c: %v, %d keys", err, len(resp.Kvs))
		}
		return resp.Kvs[0].ModRevision
	}
	before := atime()
	// Released by its owner without a removal: the access time moves.
	if err := owner.Handle("c").DecRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	if after := atime(); after <= before {
		t.Errorf("access time revision %d after releasing a cached reference; want > %d", after, before)
	}
	if err := owner.Handle("c").IncRefCachedContext(ctx); err != nil {
		t.Fatal(err)
	}
	rev, err := cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := remover.Handle("c").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove with only a cached reference = %v, %v; want true, nil", ok, err)
	}
	// The cluster's event stream shows the request, the release and the
	// removal.
	var kinds []string
	stop := errors.New("removed")
	err = remover.WatchCluster(ctx, rev.Header.Revision+1, nil, func(ev etcdstore.ClusterEvent) error {
		if ev.Kind == etcdstore.ClusterYield && (ev.ID != "c" || ev.Host != "remover") {
			t.Errorf("yield event %+v; want package c, host remover", ev)
		}
		kinds = append(kinds, ev.Kind)
		if ev.Kind == etcdstore.ClusterRemoved {
			return stop
		}
		return nil
	})
	if want := []string{etcdstore.ClusterYield, etcdstore.ClusterRefDropped, etcdstore.ClusterRemoved}; !errors.Is(err, stop) || !slices.Equal(kinds, want) {
		t.Errorf("cluster events of the removal = %v (%v); want %v", kinds, err, want)
	}
	select {
	case got := <-asked:
		if got != "c by remover" {
			t.Errorf("yield request = %q; want %q", got, "c by remover")
		}
	default:
		t.Error("the owner was not asked to yield")
	}
	if len(asked) != 0 {
		t.Errorf("%d more yield requests; want only the one for c", len(asked))
	}
	if err := remover.Handle("c").IncRefContext(ctx); !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("IncRef after removal = %v; want ErrPackageNotExist", err)
	}
	resp, err := cli.Get(ctx, etcdstore.DefaultPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if k := string(kv.Key); k == etcdstore.DefaultPrefix+"ask/yield/c" || k == etcdstore.DefaultPrefix+"atime/c" {
			t.Errorf("%s left behind after the removal", k)
		}
	}
}

// An owner that keeps its cached reference (a job holds the package)
// makes the removal wait at most the yield wait and report it in use.
func TestYieldRefusedKeepsPackage(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	owner := newStore(t, srv, root, etcdstore.WithHost("owner"))
	remover := newStore(t, srv, root, etcdstore.WithHost("remover"), etcdstore.WithYieldWait(100*time.Millisecond))
	build(t, owner, "k")
	if err := owner.Handle("k").IncRefCachedContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	if ok, err := remover.Handle("k").TryRemoveContext(context.Background()); ok || err != nil {
		t.Fatalf("TryRemove with a kept cached reference = %v, %v; want false, nil", ok, err)
	}
	if err := remover.Handle("k").IncRefContext(context.Background()); err != nil {
		t.Errorf("IncRef after the refused removal = %v; want the package still there", err)
	}
}
