package cache_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/etcdtest"
)

// exerciseStoreSigned runs the farm's story with signatures on: a builder
// host signs what it uploads; every other host trusts only the farm's key,
// gets a good entry without running its builder on a fresh cluster, and
// builds instead of using a damaged or foreign entry, saying why.
func exerciseStoreSigned(t *testing.T, open func(t *testing.T, opts ...cache.Option) *cache.Remote, objs objects) {
	ctx := context.Background()
	farm, err := cache.GenerateKey("farm-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	builder := newHost(t, open(t, cache.WithSignKey(farm)))
	recs := map[string]etcdstore.PackageRecord{}
	for _, id := range []string{"tool", "other"} {
		recs[id] = builder.build(t, id, deterministic(builder, id))
		builder.ev.wait(t, etcdstore.EventCacheStored, id)
	}
	upload := func(t *testing.T, id string, k *cache.SecretKey) {
		t.Helper()
		var opts []cache.Option
		if k != nil {
			opts = append(opts, cache.WithSignKey(k))
		}
		if err := open(t, opts...).Store(ctx, id, builder.store.Handle(id).OutputDirectory(), recs[id]); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("good signed entry hits on a fresh cluster", func(t *testing.T) {
		h := newHost(t, open(t, cache.WithTrustedKeys(farm.Public())))
		h.build(t, "tool", mustNotRun(t))
		h.ev.wait(t, etcdstore.EventCacheHit, "tool")
	})
	for _, tc := range tamperCases {
		t.Run(tc.name, func(t *testing.T) {
			upload(t, "tool", farm)
			tc.apply(t, objs, "tool", func(k *cache.SecretKey) { upload(t, "tool", k) })
			consumer := open(t, cache.WithTrustedKeys(farm.Public()))
			h := newHost(t, consumer)
			var ran atomic.Int32
			rec := h.build(t, "tool", func(ctx context.Context) error {
				ran.Add(1)
				return deterministic(h, "tool")(ctx)
			})
			if ran.Load() != 1 {
				t.Errorf("the builder ran %d times, want once (the entry must be refused)", ran.Load())
			}
			if rec.FromCache || rec.Digest != recs["tool"].Digest {
				t.Errorf("published %+v; want the builder's tree, digest %s", rec, recs["tool"].Digest)
			}
			miss := h.ev.wait(t, etcdstore.EventCacheMiss, "tool")
			var rej *cache.RejectedError
			if !errors.As(miss.Err, &rej) || rej.Reason != tc.reason {
				t.Errorf("cache-miss event says %v; want a rejection for %q", miss.Err, tc.reason)
			}
			if got := consumer.Stats().Rejected[tc.reason]; got != 1 {
				t.Errorf("Stats.Rejected[%s] = %d, want 1", tc.reason, got)
			}
		})
	}
}

func TestStoreSignedDirCache(t *testing.T) {
	base := t.TempDir()
	open := func(t *testing.T, opts ...cache.Option) *cache.Remote {
		r, err := cache.NewDir(base, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		return r
	}
	exerciseStoreSigned(t, open, dirObjects(base))
}

// fetchOnly is a Cache that fetches from a Remote and uploads nothing, so
// that a test against a server that never answers does not wait for a
// background upload when it closes its stores.
type fetchOnly struct{ r *cache.Remote }

func (f fetchOnly) Fetch(ctx context.Context, id, dir string) (bool, error) {
	return f.r.Fetch(ctx, id, dir)
}

func (fetchOnly) Store(context.Context, string, string, etcdstore.PackageRecord) error { return nil }

// TestStalledCacheCostsAtMostTheBudget: a cache that accepts connections
// and never answers, with per-request deadlines far longer than the test
// may take. Two hosts of one cluster want the package: the one holding the
// lock gives up on the cache when its fetch budget is spent and builds, and
// the other gets the package. Without the budget both Builds would hit
// their one-minute deadline instead.
func TestStalledCacheCostsAtMostTheBudget(t *testing.T) {
	for _, scheme := range []string{"http", "s3"} {
		t.Run(scheme, func(t *testing.T) {
			url, accepted := hangingServer(t, "")
			opts := []cache.Option{cache.WithTimeout(time.Hour), cache.WithFetchBudget(time.Second)}
			if scheme == "s3" {
				url = "s3://bucket/prefix?endpoint=" + url[:len(url)-1]
				t.Setenv("AWS_ACCESS_KEY_ID", "test")
				t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
			}
			r := openHTTP(t, url, opts...)
			srv := etcdtest.Start(t)
			root := t.TempDir()
			var ran atomic.Int32
			var wg sync.WaitGroup
			errs := make([]error, 2)
			for i := range 2 {
				s, err := etcdstore.New(context.Background(), srv.Client(t), root, etcdstore.WithTTL(3*time.Second),
					etcdstore.WithCache(fetchOnly{r}), etcdstore.WithHost(fmt.Sprintf("host%d", i)))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { s.Close() })
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					h := s.Handle("tool")
					errs[i] = h.BuildContext(ctx, func(context.Context) error {
						ran.Add(1)
						return writeDeterministic(h.OutputDirectory(), "tool")
					})
				})
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("host%d: Build: %v", i, err)
				}
			}
			if ran.Load() != 1 {
				t.Errorf("the builder ran %d times, want once", ran.Load())
			}
			select {
			case <-accepted:
			default:
				t.Error("the stalled server saw no connection: the cache was not tried")
			}
			if st := r.Stats(); st.BudgetSpent != 1 || st.Hits != 0 {
				t.Errorf("Stats = %+v; want one fetch that spent its budget", st)
			}
		})
	}
}
