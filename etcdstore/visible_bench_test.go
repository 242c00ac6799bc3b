package etcdstore_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/internal/netfstest"
)

// How long a host waits to see a package another host published, and what
// the look costs when the tree is visible at once:
//
//	go test -run '^$' -bench 'Visible' -benchtime 3x ./etcdstore/
//	go test -run '^$' -bench 'AwaitVisibleLocal|IncRefDecRef$' -benchtime 2000x ./etcdstore/
//
// docs/benchmarks.md has the numbers.

// BenchmarkVisibleAfterPublish: host A publishes a new package and host B,
// as soon as etcd says it is available, waits until it can see the tree.
// "negative" is the worst case: B looked the package up just before it
// existed, so its cache holds a negative entry. It reports the longest
// and the mean wait per op.
func BenchmarkVisibleAfterPublish(b *testing.B) {
	for _, tc := range []struct {
		name     string
		opts     string // "" with local: one local directory
		local    bool
		negative bool
	}{
		{"local", "", true, true},
		{"nfs-like/fresh", netfstest.NFSLike, false, false},
		{"nfs-like/negative", netfstest.NFSLike, false, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var roots [2]string
			if tc.local {
				roots[0] = b.TempDir()
				roots[1] = roots[0]
			} else {
				e := netfstest.Mount(b, netfstest.Config{Hosts: 2, Options: tc.opts})
				roots[0], roots[1] = e.Path(0, "root"), e.Path(1, "root")
			}
			srv := etcdtest.Start(b)
			var st [2]*etcdstore.Store
			for i := range st {
				cli := srv.Client(b)
				s, err := etcdstore.New(context.Background(), cli, roots[i], etcdstore.WithTTL(testTTL))
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { s.Close() })
				st[i] = s
			}
			ctx := context.Background()
			var longest, total time.Duration
			n := 0
			for b.Loop() {
				id := "p" + strconv.Itoa(n)
				n++
				b.StopTimer()
				if tc.negative {
					os.Stat(filepath.Join(st[1].Handle(id).OutputDirectory(), "f")) //nolint:errcheck // the lookup that caches a negative entry
				}
				h := st[0].Handle(id)
				if err := h.Build(func() error {
					return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("x"), 0o644)
				}); err != nil {
					b.Fatal(err)
				}
				info, err := st[1].Inspect(ctx, id)
				if err != nil || info.Package == nil {
					b.Fatal(info, err)
				}
				info.Package.Entries = 1
				b.StartTimer()
				start := time.Now()
				if err := etcdstore.AwaitVisible(ctx, st[1], id, info.Package); err != nil {
					b.Fatal(err)
				}
				d := time.Since(start)
				total += d
				longest = max(longest, d)
			}
			b.ReportMetric(longest.Seconds(), "max-wait-s")
			b.ReportMetric(total.Seconds()/float64(n), "mean-wait-s")
		})
	}
}

// BenchmarkAwaitVisibleLocal is the look on the fast path (Build of an
// available package, IncRef, run) when the tree is visible: compare with
// BenchmarkIncRefDecRef and BenchmarkBuildAvailable.
func BenchmarkAwaitVisibleLocal(b *testing.B) {
	srv := etcdtest.Start(b)
	s := newStoreB(b, srv)
	h := s.Handle("hot")
	if err := h.Build(func() error {
		for i := range 20 {
			if err := os.WriteFile(filepath.Join(h.OutputDirectory(), "f"+strconv.Itoa(i)), nil, 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	info, err := s.Inspect(context.Background(), "hot")
	if err != nil {
		b.Fatal(err)
	}
	info.Package.Entries = 20
	ctx := context.Background()
	b.Run("seen", func(b *testing.B) { // this store saw this attempt before
		for b.Loop() {
			if err := etcdstore.AwaitVisible(ctx, s, "hot", info.Package); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("first-look", func(b *testing.B) { // as in a new process (`granary run`)
		rec := *info.Package
		for b.Loop() {
			rec.Attempt++ // never seen: the full look
			if err := etcdstore.AwaitVisible(ctx, s, "hot", &rec); err != nil {
				b.Fatal(err)
			}
		}
	})
}
