package etcdstore_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// TestWaitersReleasedBeforeLockCleanup checks that the callers waiting on
// another host's build return as soon as their store sees the publish,
// without waiting for the store to leave the package's lock queue (one
// more etcd write): the clean-up is held by a hook until every caller has
// returned.
func TestWaitersReleasedBeforeLockCleanup(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	ctx := context.Background()
	const id, callers = "shared", 5

	building := make(chan struct{})
	var buildingOnce sync.Once
	builder := newStore(t, srv, root, etcdstore.WithEvents(func(ev etcdstore.Event) {
		if ev.Kind == etcdstore.EventBuilding {
			buildingOnce.Do(func() { close(building) })
		}
	}))
	waiting := make(chan struct{})
	var waitingOnce sync.Once
	waiter := newStore(t, srv, root, etcdstore.WithEvents(func(ev etcdstore.Event) {
		if ev.Kind == etcdstore.EventWaiting {
			waitingOnce.Do(func() { close(waiting) })
		}
	}))
	inCleanup, proceed := make(chan struct{}), make(chan struct{})
	var cleanupOnce, proceedOnce sync.Once
	letCleanupProceed := func() { proceedOnce.Do(func() { close(proceed) }) }
	t.Cleanup(letCleanupProceed) // runs before the stores close, even on failure
	etcdstore.SetTestHookCleanup(waiter, func(string) {
		cleanupOnce.Do(func() { close(inCleanup) })
		<-proceed
	})

	release := make(chan struct{})
	built := make(chan error, 1)
	go func() {
		built <- builder.Handle(id).BuildContext(ctx, func(context.Context) error { <-release; return nil })
	}()
	<-building
	results := make(chan error, callers)
	for range callers {
		go func() {
			results <- waiter.Handle(id).BuildContext(ctx, func(context.Context) error {
				t.Error("a waiter's builder ran")
				return nil
			})
		}()
	}
	<-waiting
	close(release)
	if err := <-built; err != nil {
		t.Fatalf("builder: %v", err)
	}
	<-inCleanup
	for i := range callers {
		select {
		case err := <-results:
			if err != nil {
				t.Fatalf("waiter %d: %v", i, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d waiters still blocked while the lock clean-up is held", callers-i, callers)
		}
	}
	letCleanupProceed()
	if err := waiter.Handle(id).BuildContext(ctx, func(context.Context) error { t.Error("builder ran again"); return nil }); err != nil {
		t.Fatalf("build after publish: %v", err)
	}
}
