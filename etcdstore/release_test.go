package etcdstore_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

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
	// A queued lock key between the builder's and the waiter's, so that the
	// publish (which also frees the builder's key) can reach the waiter
	// only through its watch, never by handing it the lock.
	raw := srv.Client(t)
	if _, err := raw.Put(ctx, etcdstore.DefaultPrefix+"lock/"+id+"/queued", ""); err != nil {
		t.Fatal(err)
	}
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

// TestPublishBeforeWatchStart checks the gap between a waiting attempt's
// read of the package and the start of its watches (which start at the
// current revision, so that etcd delivers their events at once): a publish
// in that gap is found by reading again, and the attempt returns without
// queueing for the lock, so it makes no etcd write at all.
func TestPublishBeforeWatchStart(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	ctx := context.Background()
	const id = "gap"

	building := make(chan struct{})
	var buildingOnce sync.Once
	builder := newStore(t, srv, root, etcdstore.WithEvents(func(ev etcdstore.Event) {
		if ev.Kind == etcdstore.EventBuilding {
			buildingOnce.Do(func() { close(building) })
		}
	}))
	var writes atomic.Int64
	cfg := etcdtest.ClientConfig(srv.Endpoint)
	cfg.DialOptions = append(cfg.DialOptions, grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			switch r := req.(type) {
			case *pb.PutRequest, *pb.DeleteRangeRequest:
				writes.Add(1)
			case *pb.TxnRequest:
				if len(r.Success) > 0 && (r.Success[0].GetRequestPut() != nil || r.Success[0].GetRequestDeleteRange() != nil) {
					writes.Add(1)
				}
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		}))
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	waiter, err := etcdstore.New(ctx, cli, root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { waiter.Close(); cli.Close() })

	release := make(chan struct{})
	built := make(chan error, 1)
	go func() {
		built <- builder.Handle(id).BuildContext(ctx, func(context.Context) error { <-release; return nil })
	}()
	<-building
	var published error
	etcdstore.SetTestHookWait(waiter, func(string) {
		// The waiter has read "building"; publish before its watches start.
		close(release)
		published = <-built
	})
	before := writes.Load()
	if err := waiter.Handle(id).BuildContext(ctx, func(context.Context) error {
		t.Error("the waiter's builder ran")
		return nil
	}); err != nil {
		t.Fatalf("waiter: %v", err)
	}
	if published != nil {
		t.Fatalf("builder: %v", published)
	}
	if got := writes.Load() - before; got != 0 {
		t.Errorf("the waiter made %d etcd writes; want 0 (it should see the publish without queueing for the lock)", got)
	}
}
