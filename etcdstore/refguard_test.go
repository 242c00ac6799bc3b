package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// refKeys counts the reference keys of id in etcd.
func refKeys(t *testing.T, cli *clientv3.Client, id string) int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, "/granary/ref/"+id+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

// cancelAfterApply is a client whose next reference Txn (a Txn that puts
// under /granary/ref/) reaches etcd and applies, but whose caller sees
// its context cancelled instead of the answer: what a client that closed
// its connection mid-IncRef (granary-run handing a job over, a Conn
// closed while the node's IncRef waited for a build) leaves behind.
type cancelAfterApply struct {
	armed  atomic.Bool
	cancel atomic.Pointer[context.CancelFunc]
	hits   atomic.Int32
}

func (c *cancelAfterApply) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	txn, ok := req.(*etcdserverpb.TxnRequest)
	if !ok || !putsRef(txn) || !c.armed.CompareAndSwap(true, false) {
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	err := invoker(context.WithoutCancel(ctx), method, req, reply, cc, opts...)
	c.hits.Add(1)
	if err != nil {
		return err
	}
	(*c.cancel.Load())()
	return context.Canceled
}

func putsRef(txn *etcdserverpb.TxnRequest) bool {
	for _, op := range txn.Success {
		if p := op.GetRequestPut(); p != nil && strings.Contains(string(p.Key), "/ref/") {
			return true
		}
	}
	return false
}

// An IncRef whose Txn applied but whose caller's context ended before the
// answer came must not leave a reference the store does not know about:
// the read-back of the ambiguous outcome has its own deadline, whatever
// happened to the caller's context. Before, it read back with the
// cancelled context, failed, and the key stayed on the lease until the
// store closed (a node: until it restarted), pinning the package.
func TestIncRefCancelledMidTxnLeavesNoRef(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	obs, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	build(t, obs, "pkg")

	var ic cancelAfterApply
	cfg := etcdtest.ClientConfig(srv.Endpoint)
	cfg.DialOptions = []grpc.DialOption{grpc.WithUnaryInterceptor(ic.intercept)}
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for _, cached := range []bool{false, true} {
		s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ic.cancel.Store(&cancel)
		ic.armed.Store(true)
		h := s.Handle("pkg")
		if cached {
			err = h.IncRefCachedContext(ctx)
		} else {
			err = h.IncRefContext(ctx)
		}
		cancel()
		if ic.hits.Load() == 0 {
			t.Fatalf("cached=%v: the interceptor never saw the reference Txn", cached)
		}
		ic.hits.Store(0)
		held, inEtcd := int64(s.HeldRefs("pkg")), refKeys(t, cli, "pkg")
		t.Logf("cached=%v: IncRef = %v; the store holds %d, etcd has %d", cached, err, held, inEtcd)
		if held != inEtcd {
			t.Errorf("cached=%v: the store holds %d references, etcd has %d keys: a reference leaked", cached, held, inEtcd)
		}
		if held == 1 {
			if err := h.DecRefContext(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		if ok, err := obs.Handle("pkg").TryRemoveContext(context.Background()); err != nil || !ok {
			t.Errorf("cached=%v: TryRemove after the cancelled IncRef = %v, %v; want true, nil", cached, ok, err)
		}
		build(t, obs, "pkg")
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// A key on the store's lease that the store does not track (an IncRef Txn
// that a frozen leader applied after its caller gave up on it) is found
// and deleted by ReconcileRefs, which reports it; a tracked reference is
// left alone.
func TestReconcileDropsUntrackedRefs(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	var dropped []string
	s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL),
		etcdstore.WithEvents(func(e etcdstore.Event) {
			if e.Kind == etcdstore.EventRefDropped {
				dropped = append(dropped, e.ID)
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	build(t, s, "kept")
	build(t, s, "leaked")
	if err := s.Handle("kept").IncRefCachedContext(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// What the applied-late Txn leaves: a reference key on our lease.
	stray := fmt.Sprintf("/granary/ref/leaked/%x/999", int64(s.Lease()))
	if _, err := cli.Put(ctx, stray, `{"host":"x"}`, clientv3.WithLease(s.Lease())); err != nil {
		t.Fatal(err)
	}
	n, err := s.ReconcileRefs(ctx)
	if err != nil {
		t.Fatalf("ReconcileRefs: %v", err)
	}
	if n != 1 || len(dropped) != 1 || dropped[0] != "leaked" {
		t.Errorf("ReconcileRefs dropped %d (events %v), want 1 (leaked)", n, dropped)
	}
	if got := refKeys(t, cli, "leaked"); got != 0 {
		t.Errorf("leaked has %d reference keys after reconciliation, want 0", got)
	}
	if got := refKeys(t, cli, "kept"); got != 1 {
		t.Errorf("kept has %d reference keys after reconciliation, want 1", got)
	}
	if n, err := s.ReconcileRefs(ctx); n != 0 || err != nil {
		t.Errorf("second ReconcileRefs = %d, %v; want 0, nil", n, err)
	}
}

// A cached reference whose key etcd deleted behind the store's back (its
// lease revoked by an operator, or the key deleted) stops being proven the
// moment the store's watch hears of it, long before the next keep-alive
// would tell: RefProven is false, and ConfirmRef takes it again if the
// package is still there, or reports it lost (EventRefLost) if another host
// removed it meanwhile.
func TestCachedRefDeletedIsNotProven(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	lost := make(chan string, 4)
	// TTL 15 s: the keep-alive comes every 5 s, so only the watch can tell
	// within the test's bound.
	s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(15*time.Second),
		etcdstore.WithEvents(func(e etcdstore.Event) {
			if e.Kind == etcdstore.EventRefLost {
				lost <- e.ID
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	obs, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	build(t, obs, "kept")
	build(t, obs, "stolen")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, id := range []string{"kept", "stolen"} {
		if err := s.Handle(id).IncRefCachedContext(ctx); err != nil {
			t.Fatal(err)
		}
		if !s.RefProven(id) {
			t.Fatalf("RefProven(%q) = false right after IncRef", id)
		}
	}
	// Hold the retake back so that the removal lands first, as it can on a
	// busy farm; then let it go.
	release := make(chan struct{})
	etcdstore.SetTestHookRetake(s, func(string) { <-release })
	if _, err := cli.Revoke(ctx, s.Lease()); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"kept", "stolen"} {
		for s.RefProven(id) {
			select {
			case <-ctx.Done():
				t.Fatalf("RefProven(%q) still true 20 s after the lease was revoked", id)
			case <-time.After(time.Millisecond):
			}
		}
	}
	if ok, err := obs.Handle("stolen").TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemove(stolen) after the revocation = %v, %v; want true, nil", ok, err)
	}
	close(release)
	if err := s.Handle("kept").ConfirmRefContext(ctx); err != nil {
		t.Errorf("ConfirmRef(kept) = %v; want nil (taken again on a new lease)", err)
	}
	if got := refKeys(t, cli, "kept"); got != 1 {
		t.Errorf("kept has %d reference keys, want 1", got)
	}
	err = s.Handle("stolen").ConfirmRefContext(ctx)
	if !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("ConfirmRef(stolen) = %v; want ErrPackageNotExist", err)
	}
	select {
	case id := <-lost:
		if id != "stolen" {
			t.Errorf("EventRefLost for %q, want stolen", id)
		}
	case <-ctx.Done():
		t.Error("no EventRefLost for the removed package")
	}
	if s.RefProven("stolen") {
		t.Error("RefProven(stolen) = true after it was removed")
	}
}

// A host waiting for another's build whose own lock attempt fails (its
// lease revoked, a frozen member) must not hang: the wait took the lock
// attempt's failure and then waited for it a second time, so every caller
// of the ID on that host hung for good, even after the other host
// published (found by the farm soak during etcd freezes).
func TestWaitEndsWhenLockAttemptFails(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cli := srv.Client(t)
	a, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithTTL(testTTL))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	release := make(chan struct{})
	started := make(chan struct{})
	aDone := make(chan error, 1)
	go func() {
		aDone <- a.Handle("pkg").Build(func() error {
			close(started)
			<-release
			return nil
		})
	}()
	<-started
	waiting := make(chan struct{})
	closeWaiting := sync.OnceFunc(func() { close(waiting) })
	etcdstore.SetTestHookWait(b, func(string) { closeWaiting() })
	bDone := make(chan error, 1)
	go func() { bDone <- b.Handle("pkg").Build(func() error { return errors.New("b must not build") }) }()
	<-waiting
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// B's lease goes: its place in the lock queue ends with an error.
	if _, err := cli.Revoke(ctx, b.Lease()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * testTTL / 3) // the keep-alive tells B; its lock attempt fails
	close(release)
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-bDone:
		if err != nil {
			t.Errorf("B's Build after A published = %v, want nil (it queues again on its new lease and sees the publish)", err)
		}
	case <-ctx.Done():
		t.Fatal("B's Build still waiting 30 s after A published: the wait hung on its lock attempt")
	}
}

// cutTxns makes the reference-less Txns that match fail with Unavailable
// without reaching etcd, as a call to a member that froze or was left
// does, up to n times.
type cutTxns struct {
	match func(*etcdserverpb.TxnRequest) bool
	n     atomic.Int32
}

func (c *cutTxns) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if txn, ok := req.(*etcdserverpb.TxnRequest); ok && c.match(txn) && c.n.Add(-1) >= 0 {
		return status.Error(codes.Unavailable, "test: the member went away")
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

func putsUnder(txn *etcdserverpb.TxnRequest, kind, contains string) bool {
	for _, op := range txn.Success {
		if p := op.GetRequestPut(); p != nil && strings.Contains(string(p.Key), "/"+kind+"/") && strings.Contains(string(p.Value), contains) {
			return true
		}
	}
	return false
}

func comparesLock(txn *etcdserverpb.TxnRequest) bool {
	for _, c := range txn.Compare {
		if strings.Contains(string(c.Key), "/lock/") {
			return true
		}
	}
	return false
}

// A publish or a failure record cut by a member going away is tried again
// instead of failing the build (the farm soak saw 1-3 builds a run fail
// with "publish: … use of closed network connection"); a failure that
// cannot be recorded at all does not leave the attempt "building" on a
// live lease, where every host would wait for it.
func TestCutAttemptTxnsAreRetried(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	watcher := srv.Client(t)
	open := func(c *cutTxns) *etcdstore.Store {
		cfg := etcdtest.ClientConfig(srv.Endpoint)
		cfg.DialOptions = []grpc.DialOption{grpc.WithUnaryInterceptor(c.intercept)}
		cli, err := clientv3.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cli.Close() })
		s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithTTL(testTTL))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}

	publish := &cutTxns{match: func(txn *etcdserverpb.TxnRequest) bool { return putsUnder(txn, "avail", "") }}
	publish.n.Store(2)
	if err := open(publish).Handle("pub").Build(func() error { return nil }); err != nil {
		t.Errorf("Build with its publish cut twice = %v, want nil", err)
	}

	// Every fenced failure Txn is cut: the record must still end.
	fail := &cutTxns{match: func(txn *etcdserverpb.TxnRequest) bool {
		return comparesLock(txn) && putsUnder(txn, "build", `"failed"`)
	}}
	fail.n.Store(100)
	s := open(fail)
	err := s.Handle("broken").Build(func() error { return errors.New("broken on purpose") })
	if err == nil {
		t.Fatal("Build of a failing builder = nil")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		resp, err := watcher.Get(ctx, "/granary/build/broken")
		if err != nil {
			t.Fatalf("the build record of broken is still there after 30 s: %v", err)
		}
		if len(resp.Kvs) == 0 || !strings.Contains(string(resp.Kvs[0].Value), `"building"`) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
}
