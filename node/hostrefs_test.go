package node_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// The node's lease is revoked through etcd's API (an operator, or a thawed
// leader), and another host removes a package the node held: no job that
// starts on the node afterwards may be handed the removed package, and the
// job that held it is told its reference is lost. Both orders are run: in
// "removed first" the node's reaction to the deleted key is held back
// (its ref-deleted event blocks) until the removal is done; in "node
// first" the node takes its reference again before the removal, which is
// then refused.
//
// Before, the node granted jobs from its cached "I hold the etcd
// reference" flag until its next keep-alive (TTL/3) told it the lease was
// gone, so a job that started after the removal got the removed tree.
func TestRevokedLeaseNeverHandsOutRemoved(t *testing.T) {
	for _, removedFirst := range []bool{true, false} {
		t.Run(map[bool]string{true: "removed first", false: "node first"}[removedFirst], func(t *testing.T) {
			srv := etcdtest.Start(t)
			root := t.TempDir()
			cfg := testConfig(t, srv, root)
			cfg.StateDir = shortDir(t)
			// A keep-alive every 5 s: only the watch of the node's own
			// reference keys can tell it in time.
			cfg.TTL = 15 * time.Second
			deleted := make(chan string, 8)
			gate := make(chan struct{})
			openGate := sync.OnceFunc(func() { close(gate) })
			if !removedFirst {
				openGate()
			}
			cfg.Events = func(e etcdstore.Event) {
				if e.Kind == etcdstore.EventRefDeleted {
					deleted <- e.ID
					<-gate
				}
			}
			n, _ := startNode(t, cfg)
			t.Cleanup(openGate)
			obs := observer(t, srv, root)
			build(t, obs, "pkg")
			running := connect(t, n)
			if err := running.Handle("pkg").IncRefContext(context.Background()); err != nil {
				t.Fatal(err)
			}
			cli := srv.Client(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			revoked := time.Now()
			if _, err := cli.Revoke(ctx, n.Store().Lease()); err != nil {
				t.Fatalf("revoke the node's lease: %v", err)
			}
			select {
			case id := <-deleted:
				t.Logf("the node heard of the deleted key of %q %v after the revocation", id, time.Since(revoked))
			case <-ctx.Done():
				t.Fatal("the node never heard that its reference key was deleted")
			}
			if !removedFirst {
				// The node takes its reference again on a new lease.
				waitRefs(t, cli, "pkg", 1)
			}
			ok, err := obs.Handle("pkg").TryRemoveContext(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if ok != removedFirst {
				t.Fatalf("TryRemove = %v, want %v", ok, removedFirst)
			}
			// A job that starts now, while the node has not acted on the
			// deleted key yet (in "removed first", its reaction is held).
			job := connect(t, n)
			got := make(chan error, 1)
			go func() { got <- job.Handle("pkg").IncRefContext(ctx) }()
			if removedFirst {
				select {
				case err := <-got:
					t.Fatalf("a job that started after the removal, before the node took its reference again: IncRef = %v at once; "+
						"want it to wait for the node to ask etcd (it was granted from the node's memory)", err)
				case <-time.After(200 * time.Millisecond):
				}
				openGate()
			}
			err = <-got
			switch {
			case removedFirst && !errors.Is(err, core.ErrPackageNotExist):
				t.Fatalf("a job that started after the removal: IncRef = %v; want ErrPackageNotExist (it was handed a removed package)", err)
			case !removedFirst && err != nil:
				t.Fatalf("IncRef of a package the node took again = %v", err)
			}
			if !removedFirst {
				return
			}
			for {
				select {
				case nt := <-running.Notices():
					if nt.Kind == agent.NoticeRefLost {
						if nt.ID != "pkg" {
							t.Fatalf("ref lost for %q, want pkg", nt.ID)
						}
						t.Logf("the running job was told %v after the revocation", time.Since(revoked))
						return
					}
					if nt.Kind == agent.NoticeNodeGone {
						t.Fatalf("connection ended: %v", nt.Err)
					}
				case <-ctx.Done():
					t.Fatal("the job holding the removed package was never told")
				}
			}
		})
	}
}

// waitRefs waits until id has want reference keys in etcd.
func waitRefs(t *testing.T, cli *clientv3.Client, id string, want int64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := etcdRefs(t, cli, id)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s has %d reference keys after 30 s, want %d", id, got, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A job whose connection closes while the node's IncRef Txn for it is on
// its way (granary-run handing a job over to granary run, a job killed at
// start, both seen around a build's end) must leave no reference behind:
// the Txn applies, the connection's context ends, and the node must still
// learn the outcome. Before, the node read the ambiguous outcome back with
// the cancelled context, never recorded the key, and the key pinned the
// package until the node restarted.
func TestConnClosedMidIncRefLeavesNoRef(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	var closeConn atomic.Pointer[func()]
	cfg := etcdtest.ClientConfig(srv.Endpoint)
	cfg.DialOptions = []grpc.DialOption{grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
		cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		txn, ok := req.(*etcdserverpb.TxnRequest)
		hook := closeConn.Load()
		if !ok || hook == nil || !putsRef(txn) || !closeConn.CompareAndSwap(hook, nil) {
			return invoker(ctx, method, req, reply, cc, opts...)
		}
		// The Txn applies; meanwhile the job's connection closes, and the
		// answer is lost with the caller's context.
		if err := invoker(context.WithoutCancel(ctx), method, req, reply, cc, opts...); err != nil {
			return err
		}
		(*hook)()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(10 * time.Second):
			return errors.New("test: the connection's close never reached the node")
		}
	})}
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	s, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithHost("host-a"))
	if err != nil {
		t.Fatal(err)
	}
	ncfg := node.DefaultConfig()
	ncfg.StateDir, ncfg.Root, ncfg.Name, ncfg.Linger = shortDir(t), root, "host-a", 100*time.Millisecond
	api, err := node.NewLocalAPI(s, ncfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- api.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		s.Close()
	}()
	obs := observer(t, srv, root)
	build(t, obs, "pkg")
	watcher := srv.Client(t)

	c, err := agent.Connect(context.Background(), ncfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	closeFn := func() { c.Close() }
	closeConn.Store(&closeFn)
	err = c.Handle("pkg").IncRefContext(context.Background())
	t.Logf("IncRef on the closed connection = %v", err)
	if closeConn.Load() != nil {
		t.Fatal("the interceptor never saw the node's reference Txn")
	}
	// The job is gone; after the linger the host's reference must go, and
	// a removal from another host must succeed.
	waitRefs(t, watcher, "pkg", 0)
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	if ok, err := obs.Handle("pkg").TryRemoveContext(rctx); !ok || err != nil {
		t.Errorf("TryRemove after the job ended = %v, %v; want true, nil", ok, err)
	}
}

// putsRef reports whether txn puts a reference key.
func putsRef(txn *etcdserverpb.TxnRequest) bool {
	for _, op := range txn.Success {
		if p := op.GetRequestPut(); p != nil && strings.Contains(string(p.Key), "/ref/") {
			return true
		}
	}
	return false
}
