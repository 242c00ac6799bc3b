package etcdstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// TestWatchCluster: a watcher on one store sees another store's build,
// reference, sweep and removal, in order, and a second watch from the
// first revision replays the same kinds.
func TestWatchCluster(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	w := newStore(t, srv, root, etcdstore.WithHost("watcher"))
	a := newStore(t, srv, root, etcdstore.WithHost("host-a"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	evs := make(chan etcdstore.ClusterEvent, 100)
	started := make(chan int64, 1)
	done := make(chan error, 1)
	go func() {
		done <- w.WatchCluster(ctx, 0, func(rev int64) { started <- rev }, func(ev etcdstore.ClusterEvent) error {
			evs <- ev
			return nil
		})
	}()
	first := <-started

	h := a.Handle("pkg")
	if err := h.Build(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if err := h.IncRef(); err != nil {
		t.Fatal(err)
	}
	if err := h.DecRef(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Prune(ctx, etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1}); err != nil {
		t.Fatal(err)
	}
	want := []string{
		etcdstore.ClusterBuilding, etcdstore.ClusterPublished, etcdstore.ClusterRefTaken, etcdstore.ClusterRefDropped,
		etcdstore.ClusterGCStarted, etcdstore.ClusterRemoved, etcdstore.ClusterGCEnded,
	}
	var got []etcdstore.ClusterEvent
	for len(got) < len(want) {
		select {
		case ev := <-evs:
			got = append(got, ev)
		case <-time.After(30 * time.Second):
			t.Fatalf("after %d events, no more within 30s; got %+v", len(got), got)
		}
	}
	for i, k := range want {
		if got[i].Kind != k {
			t.Fatalf("event %d = %+v, want kind %s (all: %+v)", i, got[i], k, got)
		}
		if k != etcdstore.ClusterGCEnded && got[i].Host != "host-a" && k != etcdstore.ClusterRemoved {
			t.Fatalf("event %d = %+v, want host-a", i, got[i])
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchCluster = %v, want context.Canceled", err)
	}

	// A replay from the first revision stops when fn says so.
	stop := errors.New("enough")
	n := 0
	err := w.WatchCluster(context.Background(), first, nil, func(ev etcdstore.ClusterEvent) error {
		if ev.Kind != want[n] {
			t.Errorf("replayed event %d = %+v, want %s", n, ev, want[n])
		}
		n++
		if n == len(want) {
			return stop
		}
		return nil
	})
	if !errors.Is(err, stop) || n != len(want) {
		t.Fatalf("replay = %v after %d events, want %v after %d", err, n, stop, len(want))
	}
}

// TestWatchClusterGraph: pins, invalidations and the pods a node's cached
// reference records are cluster events.
func TestWatchClusterGraph(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	w := newStore(t, srv, root, etcdstore.WithHost("watcher"))
	a := newStore(t, srv, root, etcdstore.WithHost("host-a"))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := a.Handle("pkg").Build(func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	evs := make(chan etcdstore.ClusterEvent, 100)
	started := make(chan int64, 1)
	go w.WatchCluster(ctx, 0, func(rev int64) { started <- rev }, func(ev etcdstore.ClusterEvent) error { //nolint:errcheck // ends with ctx
		evs <- ev
		return nil
	})
	<-started
	h := a.Handle("pkg")
	steps := []func() error{
		func() error {
			_, err := a.Pin(ctx, "pkg", etcdstore.PinOptions{By: "alice", Note: "release"})
			return err
		},
		func() error { _, err := a.Unpin(ctx, "pkg"); return err },
		func() error { return h.IncRefCachedContext(ctx) },
		func() error { return h.RecordPods(ctx, []string{"farm/job-1"}) },
		func() error { return h.RecordPods(ctx, nil) },
		func() error { _, err := a.Invalidate(ctx, "pkg", "bad", "bob"); return err },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{etcdstore.ClusterPinned, etcdstore.ClusterUnpinned, etcdstore.ClusterRefTaken,
		etcdstore.ClusterPodMounted, etcdstore.ClusterPodUnmount, etcdstore.ClusterInvalidated}
	for i, kind := range want {
		select {
		case ev := <-evs:
			ok := ev.Kind == kind
			switch kind {
			case etcdstore.ClusterPinned:
				ok = ok && ev.By == "alice" && ev.Purpose == "release"
			case etcdstore.ClusterPodMounted, etcdstore.ClusterPodUnmount:
				ok = ok && ev.Purpose == "pod farm/job-1" && ev.Host == "host-a"
			case etcdstore.ClusterInvalidated:
				ok = ok && ev.By == "bob" && ev.Reason == "bad"
			}
			if !ok {
				t.Fatalf("event %d = %+v, want %s", i, ev, kind)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("no %s event within 30s", kind)
		}
	}
}
