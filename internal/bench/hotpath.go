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
	raw, err := r.client()
	if err != nil {
		return err
	}
	cctx, cancel := r.opCtx(ctx)
	lease, err := raw.Grant(cctx, int64(r.z.TTL/time.Second))
	cancel()
	if err != nil {
		return err
	}
	ka, err := raw.KeepAlive(ctx, lease.ID)
	if err != nil {
		return err
	}
	go func() {
		for range ka { // drained until the client closes
		}
	}()
	rawAvail, rawAtime, rawRef := r.prefix+"raw/avail", r.prefix+"raw/atime", r.prefix+"raw/ref/"
	cctx, cancel = r.opCtx(ctx)
	_, err = raw.Put(cctx, rawAvail, "x")
	cancel()
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
	rawPair := func(ctx context.Context, i int) (time.Duration, error) {
		k := rawRef + strconv.Itoa(i)
		t := time.Now()
		cctx, cancel := r.opCtx(ctx)
		_, err := raw.Txn(cctx).If(clientv3.Compare(clientv3.CreateRevision(rawAvail), ">", 0)).
			Then(clientv3.OpPut(k, "{}", clientv3.WithLease(lease.ID)), clientv3.OpPut(rawAtime, strconv.FormatInt(t.UnixNano(), 10))).
			Commit()
		cancel()
		if err != nil {
			return 0, err
		}
		lat := time.Since(t)
		cctx, cancel = r.opCtx(ctx)
		_, err = raw.Delete(cctx, k)
		cancel()
		return lat, err
	}
	rawPut := func(ctx context.Context, i int) (time.Duration, error) {
		t := time.Now()
		cctx, cancel := r.opCtx(ctx)
		_, err := raw.Put(cctx, rawRef+strconv.Itoa(i%64), "x")
		cancel()
		return time.Since(t), err
	}

	latLevel := r.z.HotConcurrency[0]
	for _, c := range r.z.HotConcurrency {
		if c <= 16 {
			latLevel = c
		}
	}
	n := r.z.HotPairs
	for _, c := range r.z.HotConcurrency {
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
			wall, lats, err = parallel(ctx, c, n, rawPair)
			if err != nil {
				return err
			}
			rWall, rLat, rCount = rWall+wall, append(rLat, lats...), addCounts(rCount, r.cnt.Snapshot().Sub(mid))
		}
		pairs := float64(n * r.z.HotRounds)
		g, rw := pairs/gWall.Seconds(), pairs/rWall.Seconds()
		r.res[fmt.Sprintf("hotpath_ops_per_s_c%d", c)] = g
		r.res[fmt.Sprintf("hotpath_raw_ops_per_s_c%d", c)] = rw
		r.res[fmt.Sprintf("hotpath_ratio_c%d", c)] = g / rw
		r.res[fmt.Sprintf("hotpath_etcd_requests_per_pair_c%d", c)] = float64(gCount.Reads+gCount.Writes) / pairs
		r.res[fmt.Sprintf("hotpath_raw_etcd_requests_per_pair_c%d", c)] = float64(rCount.Reads+rCount.Writes) / pairs
		r.series.HotConcurrency = append(r.series.HotConcurrency, c)
		r.series.HotGranary = append(r.series.HotGranary, g)
		r.series.HotRaw = append(r.series.HotRaw, rw)
		r.logf("  c=%d: granary %.0f pairs/s, raw %.0f pairs/s, ratio %.2f, etcd requests per pair %.2f vs %.2f",
			c, g, rw, g/rw, r.res[fmt.Sprintf("hotpath_etcd_requests_per_pair_c%d", c)], r.res[fmt.Sprintf("hotpath_raw_etcd_requests_per_pair_c%d", c)])
		if c == latLevel {
			r.res["hotpath_p50_ms"] = ms(quantile(gLat, 0.5))
			r.res["hotpath_p99_ms"] = ms(quantile(gLat, 0.99))
			r.res["hotpath_raw_txn_p50_ms"] = ms(quantile(rLat, 0.5))
			r.res["hotpath_raw_txn_p99_ms"] = ms(quantile(rLat, 0.99))
			_, puts, err := parallel(ctx, c, n*r.z.HotRounds, rawPut)
			if err != nil {
				return err
			}
			r.res["hotpath_raw_put_p50_ms"] = ms(quantile(puts, 0.5))
			r.res["hotpath_raw_put_p99_ms"] = ms(quantile(puts, 0.99))
			r.res["hotpath_latency_concurrency"] = float64(c)
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

func addCounts(a, b Counts) Counts {
	return Counts{a.Reads + b.Reads, a.Writes + b.Writes, a.Other + b.Other}
}
