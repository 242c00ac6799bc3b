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
