package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/granary-build/granary/etcdstore"
)

// tracker collects the store events the build scenarios wait for.
type tracker struct {
	mu        sync.Mutex
	waiting   map[string]map[string]bool // ID → hosts waiting on another's attempt
	published map[string]time.Time       // ID → when the builder's publish Txn returned
	building  map[string]time.Time       // ID → when a builder started (EventBuilding)
	changed   chan struct{}              // closed and replaced on every event
}

func newTracker() *tracker {
	return &tracker{waiting: map[string]map[string]bool{}, published: map[string]time.Time{},
		building: map[string]time.Time{}, changed: make(chan struct{})}
}

func (t *tracker) hook(host string) etcdstore.Option {
	return etcdstore.WithEvents(func(ev etcdstore.Event) {
		t.mu.Lock()
		defer t.mu.Unlock()
		switch ev.Kind {
		case etcdstore.EventWaiting:
			if t.waiting[ev.ID] == nil {
				t.waiting[ev.ID] = map[string]bool{}
			}
			t.waiting[ev.ID][host] = true
		case etcdstore.EventPublished:
			t.published[ev.ID] = ev.Time
		case etcdstore.EventBuilding:
			if _, ok := t.building[ev.ID]; !ok {
				t.building[ev.ID] = ev.Time
			}
		default:
			return
		}
		close(t.changed)
		t.changed = make(chan struct{})
	})
}

// await blocks until cond (called under the tracker's lock) holds, ctx ends,
// or d passes.
func (t *tracker) await(ctx context.Context, d time.Duration, what string, cond func() bool) error {
	timeout := time.After(d)
	for {
		t.mu.Lock()
		ok, ch := cond(), t.changed
		t.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-timeout:
			return fmt.Errorf("%s did not happen within %v", what, d)
		}
	}
}

// hosts opens n stores, each on its own client, reporting to t.
func (r *run) hosts(ctx context.Context, name string, n int, t *tracker) ([]*etcdstore.Store, error) {
	var out []*etcdstore.Store
	for i := range n {
		host := fmt.Sprintf("%s-%d", name, i)
		s, _, err := r.store(ctx, host, t.hook(host))
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// waiters measures how fast the waiters of one build are released: one
// store builds; WaiterStores other stores with k goroutines each call Build
// on the same ID and wait. Once every store is seen waiting, the builder
// returns; each waiter's latency is its return time minus the moment the
// builder's publish Txn returned (a waiter that returned even earlier
// counts as 0).
func (r *run) waiters(ctx context.Context) error {
	t := newTracker()
	builder, _, err := r.store(ctx, "waiters-builder", t.hook("waiters-builder"))
	if err != nil {
		return err
	}
	stores, err := r.hosts(ctx, "waiter", r.z.WaiterStores, t)
	if err != nil {
		return err
	}
	var ran atomic.Int64
	for _, k := range r.z.WaiterCounts {
		var lats []time.Duration
		for round := range r.z.WaiterRounds {
			id := fmt.Sprintf("waiters-%d-%d", k, round)
			release := make(chan struct{})
			built := make(chan error, 1)
			go func() {
				built <- builder.Handle(id).BuildContext(ctx, func(ctx context.Context) error {
					select {
					case <-release:
						return nil
					case <-ctx.Done():
						return ctx.Err()
					}
				})
			}()
			if err := t.await(ctx, 30*time.Second, "the build start", func() bool { _, ok := t.building[id]; return ok }); err != nil {
				close(release)
				return errors.Join(err, <-built)
			}
			var wg sync.WaitGroup
			returned := make([]time.Time, 0, k*len(stores))
			var mu sync.Mutex
			var errs []error
			for _, s := range stores {
				for range k {
					wg.Go(func() {
						err := s.Handle(id).BuildContext(ctx, func(context.Context) error { ran.Add(1); return nil })
						now := time.Now()
						mu.Lock()
						defer mu.Unlock()
						if err != nil {
							errs = append(errs, err)
						}
						returned = append(returned, now)
					})
				}
			}
			err := t.await(ctx, 30*time.Second, "every store waiting", func() bool { return len(t.waiting[id]) == len(stores) })
			close(release)
			wg.Wait()
			if err := errors.Join(err, <-built, errors.Join(errs...)); err != nil {
				return err
			}
			t.mu.Lock()
			pub := t.published[id]
			t.mu.Unlock()
			for _, at := range returned {
				lats = append(lats, max(0, at.Sub(pub)))
			}
		}
		if n := ran.Load(); n != 0 {
			return fmt.Errorf("a waiter's builder ran %d times", n)
		}
		total := k * len(stores)
		p50, p99, pmax := ms(quantile(lats, 0.5)), ms(quantile(lats, 0.99)), ms(quantile(lats, 1))
		r.res[fmt.Sprintf("waiters_release_p50_ms_%d", total)] = p50
		r.res[fmt.Sprintf("waiters_release_p99_ms_%d", total)] = p99
		r.res[fmt.Sprintf("waiters_release_max_ms_%d", total)] = pmax
		r.series.Waiters = append(r.series.Waiters, total)
		r.series.WaiterP50 = append(r.series.WaiterP50, p50)
		r.series.WaiterP99 = append(r.series.WaiterP99, p99)
		r.logf("  %d stores × %d waiters: release p50 %.1f ms, p99 %.1f ms, max %.1f ms", len(stores), k, p50, p99, pmax)
		r.res["waiters_release_p50_ms"], r.res["waiters_release_p99_ms"] = p50, p99
		r.res["waiters_count"] = float64(total)
	}
	return nil
}

// stampede makes StampedeCalls concurrent Build calls on one ID, spread
// over WaiterStores stores, with a builder that takes StampedeBuild. It
// reports the median wall time minus the build time, the most builder runs
// of any round (1 when the build lock works), and the median time from the
// first call to the builder's start, next to the same with one caller per
// store: callers join their store's attempt before any etcd round trip, so
// that time should not grow with the number of callers.
func (r *run) stampede(ctx context.Context) error {
	stores, err := r.hosts(ctx, "stampede", r.z.WaiterStores, newTracker())
	if err != nil {
		return err
	}
	var overheads, starts, fewStarts []time.Duration
	maxRuns := int64(0)
	for round := range r.z.StampedeRounds {
		// One caller per store first (a different ID), then the stampede.
		few, err := r.stampedeRound(ctx, stores, fmt.Sprintf("stampede-few-%d", round), len(stores))
		if err != nil {
			return err
		}
		fewStarts = append(fewStarts, few.toStart)
		before := r.cnt.Snapshot()
		st, err := r.stampedeRound(ctx, stores, fmt.Sprintf("stampede-%d", round), r.z.StampedeCalls)
		if err != nil {
			return err
		}
		c := r.cnt.Snapshot().Sub(before)
		overheads = append(overheads, st.wall-r.z.StampedeBuild)
		starts = append(starts, st.toStart)
		maxRuns = max(maxRuns, st.runs, few.runs)
		r.logf("  round %d: wall %.1f ms, builder started after %.2f ms (%.2f ms with %d callers), builder runs %d, etcd writes %d, reads %d",
			round, ms(st.wall), ms(st.toStart), ms(few.toStart), len(stores), st.runs, c.Writes, c.Reads)
		r.res["stampede_etcd_writes"] = float64(c.Writes)
	}
	r.res["stampede_overhead_ms"] = ms(quantile(overheads, 0.5))
	r.res["stampede_overhead_max_ms"] = ms(quantile(overheads, 1))
	r.res["stampede_start_ms"] = ms(quantile(starts, 0.5))
	r.res["stampede_start_few_ms"] = ms(quantile(fewStarts, 0.5))
	r.res["stampede_start_delta_ms"] = ms(quantile(starts, 0.5) - quantile(fewStarts, 0.5))
	r.res["stampede_builds"] = float64(maxRuns)
	r.res["stampede_calls"] = float64(r.z.StampedeCalls)
	return nil
}

// stampedeResult is one round of stampede.
type stampedeResult struct {
	wall, toStart time.Duration
	runs          int64
}

// stampedeRound makes calls concurrent Build calls of id over stores.
func (r *run) stampedeRound(ctx context.Context, stores []*etcdstore.Store, id string, calls int) (stampedeResult, error) {
	var runs atomic.Int64
	var started atomic.Int64 // unix ns of the builder's first start
	builder := func(ctx context.Context) error {
		started.CompareAndSwap(0, time.Now().UnixNano())
		runs.Add(1)
		select {
		case <-time.After(r.z.StampedeBuild): // the build's work
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, calls)
	for i := range calls {
		wg.Go(func() { errs[i] = stores[i%len(stores)].Handle(id).BuildContext(ctx, builder) })
	}
	wg.Wait()
	res := stampedeResult{wall: time.Since(start), toStart: time.Unix(0, started.Load()).Sub(start), runs: runs.Load()}
	return res, errors.Join(errs...)
}

// distinct builds DistinctBuilds trivial packages of distinct IDs at
// DistinctConcurrency across WaiterStores stores, counting etcd requests.
func (r *run) distinct(ctx context.Context) error {
	stores, err := r.hosts(ctx, "distinct", r.z.WaiterStores, newTracker())
	if err != nil {
		return err
	}
	before := r.cnt.Snapshot()
	wall, _, err := parallel(ctx, r.z.DistinctConcurrency, r.z.DistinctBuilds, func(ctx context.Context, i int) (time.Duration, error) {
		return 0, stores[i%len(stores)].Handle(fmt.Sprintf("distinct-%d", i)).BuildContext(ctx, func(context.Context) error { return nil })
	})
	if err != nil {
		return err
	}
	c := r.cnt.Snapshot().Sub(before)
	n := float64(r.z.DistinctBuilds)
	r.res["distinct_builds_per_s"] = n / wall.Seconds()
	r.res["distinct_etcd_writes_per_build"] = float64(c.Writes) / n
	r.res["distinct_etcd_reads_per_build"] = float64(c.Reads) / n
	r.logf("  %.0f builds/s, %.2f etcd writes and %.2f reads per build", n/wall.Seconds(), float64(c.Writes)/n, float64(c.Reads)/n)
	return nil
}

// takeover starts a build on one store, makes a second store wait for it,
// then closes the first store's etcd client (its lease is neither renewed
// nor revoked: a crash, as etcd sees it; its builder stays stuck, as a
// crashed host's would) and measures the time until the second store's
// builder starts.
func (r *run) takeover(ctx context.Context) error {
	t := newTracker()
	dead, deadCli, err := r.store(ctx, "takeover-dead", t.hook("takeover-dead"))
	if err != nil {
		return err
	}
	heir, _, err := r.store(ctx, "takeover-heir", t.hook("takeover-heir"))
	if err != nil {
		return err
	}
	const id = "takeover"
	deadDone := make(chan error, 1)
	frozen := make(chan struct{}) // closed once the heir has taken over
	go func() {
		deadDone <- dead.Handle(id).BuildContext(ctx, func(bctx context.Context) error {
			// A crashed host's builder never returns: it would otherwise
			// release the lock cleanly once its store gives up the lease,
			// which a closed client can still do in the moment it closes.
			<-frozen
			return bctx.Err()
		})
	}()
	defer func() {
		select {
		case <-frozen:
		default:
			close(frozen)
		}
	}()
	if err := t.await(ctx, 30*time.Second, "the first build start", func() bool { _, ok := t.building[id]; return ok }); err != nil {
		return err
	}
	var startedAt atomic.Int64
	heirDone := make(chan error, 1)
	go func() {
		heirDone <- heir.Handle(id).BuildContext(ctx, func(context.Context) error {
			startedAt.Store(time.Now().UnixNano())
			return nil
		})
	}()
	if err := t.await(ctx, 30*time.Second, "the second store waiting", func() bool { return t.waiting[id]["takeover-heir"] }); err != nil {
		return err
	}
	killed := time.Now()
	deadCli.Close()
	limit := r.z.TTL + r.z.LockDelay + 30*time.Second
	select {
	case err := <-heirDone:
		if err != nil {
			return fmt.Errorf("the heir's build: %w", err)
		}
	case <-time.After(limit):
		return fmt.Errorf("no takeover within %v", limit)
	case <-ctx.Done():
		return ctx.Err()
	}
	close(frozen)
	if err := <-deadDone; err == nil {
		return errors.New("the dead builder's build succeeded")
	}
	took := time.Unix(0, startedAt.Load()).Sub(killed)
	r.res["takeover_s"] = took.Seconds()
	r.res["ttl_s"] = r.z.TTL.Seconds()
	r.res["lock_delay_s"] = r.z.LockDelay.Seconds()
	r.logf("  takeover after %.2f s (TTL %v, lock delay %v)", took.Seconds(), r.z.TTL, r.z.LockDelay)
	return nil
}
