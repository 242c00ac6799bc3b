package etcdstore_test

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// The hot paths next to a raw etcd baseline on the same embedded server:
//
//	go test -run '^$' -bench . -benchtime 2000x ./etcdstore/
//
// Compare commits with benchstat (go run golang.org/x/perf/cmd/benchstat).
// The end-to-end scenarios (stampede, takeover, prune, memory) are
// `granary-bench` (cmd/granary-bench).

// BenchmarkRawPut is the baseline: one Put, one Raft write.
func BenchmarkRawPut(b *testing.B) {
	srv := etcdtest.Start(b)
	cli := srv.Client(b)
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		if _, err := cli.Put(ctx, "/raw/"+strconv.Itoa(i%64), "x"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRawTxnPair is the baseline for IncRef+DecRef: the same two
// writes (a guarded Txn putting two keys, then a Delete) on plain keys.
func BenchmarkRawTxnPair(b *testing.B) {
	srv := etcdtest.Start(b)
	cli := srv.Client(b)
	ctx := context.Background()
	cli.Put(ctx, "/raw/avail", "x")
	for i := 0; b.Loop(); i++ {
		k := "/raw/ref/" + strconv.Itoa(i)
		if _, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision("/raw/avail"), ">", 0)).
			Then(clientv3.OpPut(k, "x"), clientv3.OpPut("/raw/atime", "1")).Commit(); err != nil {
			b.Fatal(err)
		}
		if _, err := cli.Delete(ctx, k); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncRefDecRef takes and releases a reference on a published
// package.
func BenchmarkIncRefDecRef(b *testing.B) {
	srv := etcdtest.Start(b)
	s := newStoreB(b, srv)
	buildB(b, s, "hot")
	h := s.Handle("hot")
	for b.Loop() {
		if err := h.IncRef(); err != nil {
			b.Fatal(err)
		}
		if err := h.DecRef(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBuildAvailable is Build on a published package: the fast path.
func BenchmarkBuildAvailable(b *testing.B) {
	srv := etcdtest.Start(b)
	s := newStoreB(b, srv)
	buildB(b, s, "ready")
	h := s.Handle("ready")
	for b.Loop() {
		if err := h.Build(func() error { b.Fatal("builder ran"); return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkBuildDistinct builds a new trivial package per iteration:
// lock, record, seal, publish.
func BenchmarkBuildDistinct(b *testing.B) {
	srv := etcdtest.Start(b)
	s := newStoreB(b, srv)
	var n atomic.Int64
	for b.Loop() {
		id := "distinct-" + strconv.FormatInt(n.Add(1), 10)
		if err := s.Handle(id).Build(func() error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncRefDecRefParallel is IncRefDecRef from 16 goroutines per
// CPU on one store (one host serving many jobs); compare with
// BenchmarkRawTxnPairParallel.
func BenchmarkIncRefDecRefParallel(b *testing.B) {
	srv := etcdtest.Start(b)
	s := newStoreB(b, srv)
	buildB(b, s, "hot")
	h := s.Handle("hot")
	cpu0 := processCPU()
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := h.IncRef(); err != nil {
				b.Error(err)
				return
			}
			if err := h.DecRef(); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
}

// BenchmarkRawTxnPairParallel is RawTxnPair from 16 goroutines per CPU.
func BenchmarkRawTxnPairParallel(b *testing.B) {
	srv := etcdtest.Start(b)
	cli := srv.Client(b)
	ctx := context.Background()
	cli.Put(ctx, "/raw/avail", "x")
	var n atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			k := "/raw/ref/" + strconv.FormatInt(n.Add(1), 10)
			if _, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision("/raw/avail"), ">", 0)).
				Then(clientv3.OpPut(k, "x"), clientv3.OpPut("/raw/atime", "1")).Commit(); err != nil {
				b.Error(err)
				return
			}
			if _, err := cli.Delete(ctx, k); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkRawRequestShapes splits what a reference pair asks of etcd
// beyond the bare minimum: raw pairs from 16 goroutines per CPU, each
// shape adding one element of the store's requests to the minimal pair (a
// Txn guarded by one compare putting a leased key and an access time,
// then a Delete); "store" is all of them, as a warm IncRef+DecRef sends
// them. Besides ns/op it reports the whole process's CPU per pair (etcd
// included: it is embedded), which a busy machine disturbs less:
//
//	go test -run '^$' -bench RawRequestShapes -benchtime 4000x -count 5 ./etcdstore/
func BenchmarkRawRequestShapes(b *testing.B) {
	type shape struct{ cmp2, val, get, txnDel, cmpDel, leader bool }
	for _, c := range []struct {
		name string
		sh   shape
	}{
		{"min", shape{}},
		{"compare-invalid", shape{cmp2: true}},
		{"ref-value", shape{val: true}},
		{"get-record", shape{get: true}},
		{"delete-in-txn-with-range", shape{txnDel: true}},
		{"delete-in-txn-with-compare", shape{cmpDel: true}},
		{"require-leader", shape{leader: true}},
		{"store", shape{cmp2: true, val: true, cmpDel: true, leader: true}},
	} {
		b.Run(c.name, func(b *testing.B) {
			srv := etcdtest.Start(b)
			cli := srv.Client(b)
			ctx := context.Background()
			record := `{"built_by":"host-01","pid":1234,"built_at":"2026-12-06T19:00:00Z","attempt":"0123456789abcdef","entries":3,"digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}`
			cli.Put(ctx, "/raw/avail", record)
			lease, err := cli.Grant(ctx, 60)
			if err != nil {
				b.Fatal(err)
			}
			val := "x"
			if c.sh.val {
				val = `{"host":"buildhost-01.example.com","pid":123456,"since":"2026-12-06T19:33:23.123456789Z","purpose":"granary run"}`
			}
			var n atomic.Int64
			cpu0 := processCPU()
			b.SetParallelism(16)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					ctx := ctx
					if c.sh.leader { // as every call of the store's
						ctx = clientv3.WithRequireLeader(ctx)
					}
					if err := rawShapePair(ctx, cli, "/raw/ref/"+strconv.FormatInt(n.Add(1), 10), val, lease.ID, c.sh.cmp2, c.sh.get, c.sh.txnDel, c.sh.cmpDel); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}

// rawShapePair is one pair of BenchmarkRawRequestShapes.
func rawShapePair(ctx context.Context, cli *clientv3.Client, k, val string, lease clientv3.LeaseID, cmp2, get, txnDel, cmpDel bool) error {
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision("/raw/avail"), ">", 0)}
	if cmp2 {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision("/raw/invalid"), "=", 0))
	}
	ops := []clientv3.Op{clientv3.OpPut(k, val, clientv3.WithLease(lease)), clientv3.OpPut("/raw/atime", "1765049603123456789")}
	if get {
		ops = append(ops, clientv3.OpGet("/raw/avail"))
	}
	if _, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit(); err != nil {
		return err
	}
	var err error
	switch {
	case txnDel:
		_, err = cli.Txn(ctx).Then(clientv3.OpDelete(k), clientv3.OpGet("/raw/invalid", clientv3.WithCountOnly())).Commit()
	case cmpDel:
		_, err = cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision("/raw/invalid"), "=", 0)).
			Then(clientv3.OpDelete(k)).Else(clientv3.OpDelete(k)).Commit()
	default:
		_, err = cli.Delete(ctx, k)
	}
	return err
}

// processCPU is the user+system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkWaitersRelease is one build awaited by 50 goroutines of a
// second store; each iteration is a new package, so it measures the whole
// wait: join, watch, lock queue, release on publish, clean-up.
func BenchmarkWaitersRelease(b *testing.B) {
	srv := etcdtest.Start(b)
	root := b.TempDir()
	builder := newStoreAt(b, srv, root)
	waiter := newStoreAt(b, srv, root)
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		id := "wait-" + strconv.Itoa(i)
		release := make(chan struct{})
		built := make(chan error, 1)
		go func() {
			built <- builder.Handle(id).BuildContext(ctx, func(context.Context) error { <-release; return nil })
		}()
		var wg sync.WaitGroup
		for range 50 {
			wg.Go(func() {
				if err := waiter.Handle(id).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
					b.Error(err)
				}
			})
		}
		close(release)
		wg.Wait()
		if err := <-built; err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncRefWaitRelease is an IncRef on another store's build in
// progress, on a busy etcd (four writers move the revision all along, as
// a farm does): each iteration is a new package; the metrics are the
// latency from the builder's return to the waiting IncRef's, p50 and max
// (its wait starts its watches at the current revision: a watch started
// at an older one would hear the publish only at etcd's next sync, up to
// 100 ms later).
func BenchmarkIncRefWaitRelease(b *testing.B) {
	srv := etcdtest.Start(b)
	root := b.TempDir()
	waiting := make(chan struct{}, 1)
	builder := newStoreAt(b, srv, root)
	waiter := newStoreAt(b, srv, root, etcdstore.WithEvents(func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventWaiting {
			waiting <- struct{}{}
		}
	}))
	cli := srv.Client(b)
	ctx, stop := context.WithCancel(context.Background())
	var writers sync.WaitGroup
	defer writers.Wait()
	defer stop()
	for w := range 4 {
		writers.Go(func() {
			for ctx.Err() == nil {
				cli.Put(ctx, "/busy/"+strconv.Itoa(w), "x") //nolint:errcheck // load only
			}
		})
	}
	var lats []time.Duration
	for i := 0; b.Loop(); i++ {
		id := "incref-wait-" + strconv.Itoa(i)
		started, release := make(chan struct{}), make(chan struct{})
		built := make(chan time.Time, 1)
		go func() {
			if err := builder.Handle(id).Build(func() error { close(started); <-release; return nil }); err != nil {
				b.Error(err)
			}
			built <- time.Now()
		}()
		<-started
		got := make(chan time.Time, 1)
		go func() {
			if err := waiter.Handle(id).IncRef(); err != nil {
				b.Error(err)
			}
			got <- time.Now()
		}()
		<-waiting // the IncRef is waiting on the attempt
		close(release)
		lats = append(lats, (<-got).Sub(<-built))
		if err := waiter.Handle(id).DecRef(); err != nil {
			b.Fatal(err)
		}
	}
	slices.Sort(lats)
	b.ReportMetric(float64(lats[len(lats)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lats[len(lats)-1].Microseconds()), "max-µs")
}

func newStoreAt(b *testing.B, srv *etcdtest.Server, root string, opts ...etcdstore.Option) *etcdstore.Store {
	b.Helper()
	cli := srv.Client(b)
	s, err := etcdstore.New(context.Background(), cli, root, append([]etcdstore.Option{etcdstore.WithTTL(testTTL)}, opts...)...)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close(); cli.Close() })
	return s
}

// buildNeeding publishes id needing n packages of its own (id-need-0…).
func buildNeeding(b *testing.B, s *etcdstore.Store, id string, n int) {
	b.Helper()
	var needs []string
	for i := range n {
		need := id + "-need-" + strconv.Itoa(i)
		buildB(b, s, need)
		needs = append(needs, need)
	}
	if err := s.Handle(id).BuildNeeds(context.Background(), needs, func(context.Context) error { return nil }); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkIncRefNeeds is IncRef+DecRef on a package with 0, 5 and 20
// needs: the closure is protected by the need edges, so the reference is
// the same one Txn whatever the count.
func BenchmarkIncRefNeeds(b *testing.B) {
	for _, n := range []int{0, 5, 20} {
		b.Run("needs="+strconv.Itoa(n), func(b *testing.B) {
			srv := etcdtest.Start(b)
			s := newStoreB(b, srv)
			buildNeeding(b, s, "top", n)
			h := s.Handle("top")
			for b.Loop() {
				if err := h.IncRef(); err != nil {
					b.Fatal(err)
				}
				if err := h.DecRef(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRemoveNeeds publishes a package with 0, 5 or 20 needs and
// removes it (the removal deletes its edges in its Txn); the publish is
// inside the loop, so compare the counts with each other, not with
// BenchmarkIncRefDecRef.
func BenchmarkRemoveNeeds(b *testing.B) {
	for _, n := range []int{0, 5, 20} {
		b.Run("needs="+strconv.Itoa(n), func(b *testing.B) {
			srv := etcdtest.Start(b)
			s := newStoreB(b, srv)
			buildNeeding(b, s, "top", n)
			var needs []string
			for i := range n {
				needs = append(needs, "top-need-"+strconv.Itoa(i))
			}
			ctx := context.Background()
			h := s.Handle("top")
			for b.Loop() {
				if ok, err := h.TryRemove(); !ok || err != nil {
					b.Fatalf("remove = %v, %v", ok, err)
				}
				b.StopTimer()
				if err := h.BuildNeeds(ctx, needs, func(context.Context) error { return nil }); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
