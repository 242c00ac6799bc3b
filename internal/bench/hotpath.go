package bench

import (
	"context"
	"fmt"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// hotpath measures IncRef+DecRef pairs on a published package at each
// concurrency level against the same two etcd writes on plain keys (a Txn
// guarded by the existence of a key, putting a leased key and an access
// time; then a Delete), alternating the two in rounds. At the middle level
// (16 in the issue, or the last below 64) it also records the latency of
// each IncRef and, as a second baseline, of a single Put.
func (r *run) hotpath(ctx context.Context) error {
	s, _, err := r.store(ctx, "hot")
	if err != nil {
		return err
	}
	h := s.Handle("hot")
	if err := h.BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
		return err
	}
	raw, err := r.rawHotpath(ctx)
	if err != nil {
		return err
	}
	granaryPair := func(ctx context.Context, _ int) (time.Duration, error) {
		t := time.Now()
		if err := h.IncRefContext(ctx); err != nil {
			return 0, err
		}
		lat := time.Since(t)
		return lat, h.DecRefContext(ctx)
	}

	latLevel := r.z.HotConcurrency[0]
	for _, c := range r.z.HotConcurrency {
		if c <= 16 {
			latLevel = c
		}
	}
	for _, c := range r.z.HotConcurrency {
		if err := r.hotLevel(ctx, c, c == latLevel, granaryPair, raw); err != nil {
			return err
		}
	}
	last := r.z.HotConcurrency[len(r.z.HotConcurrency)-1]
	r.res["hotpath_ops_per_s"] = r.res[fmt.Sprintf("hotpath_ops_per_s_c%d", last)]
	r.res["hotpath_raw_ops_per_s"] = r.res[fmt.Sprintf("hotpath_raw_ops_per_s_c%d", last)]
	r.res["hotpath_ratio"] = r.res[fmt.Sprintf("hotpath_ratio_c%d", last)]
	if held := s.HeldRefs("hot"); held != 0 {
		return fmt.Errorf("%d references still held after the hot path", held)
	}
	return nil
}

// rawHot is the hot path's raw-etcd baseline: a client of its own, a lease
// kept alive for the run, and the keys its pairs write.
type rawHot struct {
	r                    *run
	cli                  *clientv3.Client
	lease                clientv3.LeaseID
	avail, atime, refPfx string
}

// rawHotpath prepares the baseline: grants its lease (kept alive until the
// client closes) and puts the key its Txn's compare checks.
func (r *run) rawHotpath(ctx context.Context) (*rawHot, error) {
	raw, err := r.client()
	if err != nil {
		return nil, err
	}
	cctx, cancel := r.opCtx(ctx)
	lease, err := raw.Grant(cctx, int64(r.z.TTL/time.Second))
	cancel()
	if err != nil {
		return nil, err
	}
	ka, err := raw.KeepAlive(ctx, lease.ID)
	if err != nil {
		return nil, err
	}
	go func() {
		for range ka { // drained until the client closes
		}
	}()
	b := &rawHot{r: r, cli: raw, lease: lease.ID,
		avail: r.prefix + "raw/avail", atime: r.prefix + "raw/atime", refPfx: r.prefix + "raw/ref/"}
	cctx, cancel = r.opCtx(ctx)
	_, err = raw.Put(cctx, b.avail, "x")
	cancel()
	if err != nil {
		return nil, err
	}
	return b, nil
}

// pair is IncRef+DecRef's two etcd writes on plain keys: the guarded Txn
// (its latency is returned) and the Delete.
func (b *rawHot) pair(ctx context.Context, i int) (time.Duration, error) {
	k := b.refPfx + strconv.Itoa(i)
	t := time.Now()
	cctx, cancel := b.r.opCtx(ctx)
	_, err := b.cli.Txn(cctx).If(clientv3.Compare(clientv3.CreateRevision(b.avail), ">", 0)).
		Then(clientv3.OpPut(k, "{}", clientv3.WithLease(b.lease)), clientv3.OpPut(b.atime, strconv.FormatInt(t.UnixNano(), 10))).
		Commit()
	cancel()
	if err != nil {
		return 0, err
	}
	lat := time.Since(t)
	cctx, cancel = b.r.opCtx(ctx)
	_, err = b.cli.Delete(cctx, k)
	cancel()
	return lat, err
}

// put is the second latency baseline: one plain Put.
func (b *rawHot) put(ctx context.Context, i int) (time.Duration, error) {
	t := time.Now()
	cctx, cancel := b.r.opCtx(ctx)
	_, err := b.cli.Put(cctx, b.refPfx+strconv.Itoa(i%64), "x")
	cancel()
	return time.Since(t), err
}

// pairFunc is one timed operation of parallel: the i-th of its n calls.
type pairFunc = func(ctx context.Context, i int) (time.Duration, error)

// hotLevel runs the rounds of concurrency level c, alternating granary's
// pairs and the raw ones, and records their rates, their etcd requests per
// pair and, when latencies is set, the latency quantiles of both and of a
// single Put.
func (r *run) hotLevel(ctx context.Context, c int, latencies bool, granaryPair pairFunc, raw *rawHot) error {
	n := r.z.HotPairs
	var gWall, rWall time.Duration
	var gLat, rLat []time.Duration
	var gCount, rCount Counts
	for range r.z.HotRounds {
		before := r.cnt.Snapshot()
		wall, lats, err := parallel(ctx, c, n, granaryPair)
		if err != nil {
			return err
		}
		mid := r.cnt.Snapshot()
		gWall, gLat, gCount = gWall+wall, append(gLat, lats...), addCounts(gCount, mid.Sub(before))
		wall, lats, err = parallel(ctx, c, n, raw.pair)
		if err != nil {
			return err
		}
		rWall, rLat, rCount = rWall+wall, append(rLat, lats...), addCounts(rCount, r.cnt.Snapshot().Sub(mid))
	}
	pairs := float64(n * r.z.HotRounds)
	g, rw := pairs/gWall.Seconds(), pairs/rWall.Seconds()
	gReq, rReq := float64(gCount.Reads+gCount.Writes)/pairs, float64(rCount.Reads+rCount.Writes)/pairs
	r.res[fmt.Sprintf("hotpath_ops_per_s_c%d", c)] = g
	r.res[fmt.Sprintf("hotpath_raw_ops_per_s_c%d", c)] = rw
	r.res[fmt.Sprintf("hotpath_ratio_c%d", c)] = g / rw
	r.res[fmt.Sprintf("hotpath_etcd_requests_per_pair_c%d", c)] = gReq
	r.res[fmt.Sprintf("hotpath_raw_etcd_requests_per_pair_c%d", c)] = rReq
	r.series.HotConcurrency = append(r.series.HotConcurrency, c)
	r.series.HotGranary = append(r.series.HotGranary, g)
	r.series.HotRaw = append(r.series.HotRaw, rw)
	r.logf("  c=%d: granary %.0f pairs/s, raw %.0f pairs/s, ratio %.2f, etcd requests per pair %.2f vs %.2f",
		c, g, rw, g/rw, gReq, rReq)
	if !latencies {
		return nil
	}
	r.res["hotpath_p50_ms"] = ms(quantile(gLat, 0.5))
	r.res["hotpath_p99_ms"] = ms(quantile(gLat, 0.99))
	r.res["hotpath_raw_txn_p50_ms"] = ms(quantile(rLat, 0.5))
	r.res["hotpath_raw_txn_p99_ms"] = ms(quantile(rLat, 0.99))
	_, puts, err := parallel(ctx, c, n*r.z.HotRounds, raw.put)
	if err != nil {
		return err
	}
	r.res["hotpath_raw_put_p50_ms"] = ms(quantile(puts, 0.5))
	r.res["hotpath_raw_put_p99_ms"] = ms(quantile(puts, 0.99))
	r.res["hotpath_latency_concurrency"] = float64(c)
	return nil
}

func addCounts(a, b Counts) Counts {
	return Counts{a.Reads + b.Reads, a.Writes + b.Writes, a.Other + b.Other}
}
