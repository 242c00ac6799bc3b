package bench

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
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
	raw, err := r.rawHotpath(ctx, h)
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
	// For the second baseline (same): the store's own reference value and
	// published record, copied, and the keys its requests also touch.
	refVal                  string
	availRev                int64
	sameAvail, build, inval string
}

// rawHotpath prepares the baselines: grants their lease (kept alive until
// the client closes), puts the keys their Txns' compares check and copies
// the values the store writes and reads for package h.
func (r *run) rawHotpath(ctx context.Context, h *etcdstore.Handle) (*rawHot, error) {
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
		avail: r.prefix + "raw/avail", atime: r.prefix + "raw/atime", refPfx: r.prefix + "raw/ref/",
		sameAvail: r.prefix + "raw/same-avail", build: r.prefix + "raw/build", inval: r.prefix + "raw/invalid"}
	availVal, err := b.copyStoreValues(ctx, h)
	if err != nil {
		return nil, err
	}
	cctx, cancel = r.opCtx(ctx)
	defer cancel()
	if _, err = raw.Put(cctx, b.avail, "x"); err != nil {
		return nil, err
	}
	put, err := raw.Put(cctx, b.sameAvail, availVal)
	if err != nil {
		return nil, err
	}
	b.availRev = put.Header.Revision
	return b, nil
}

// copyStoreValues reads, while h holds a reference, the value of its
// reference key (kept for same) and returns the published record of its
// package.
func (b *rawHot) copyStoreValues(ctx context.Context, h *etcdstore.Handle) (avail string, err error) {
	if err := h.IncRefContext(ctx); err != nil {
		return "", err
	}
	defer h.DecRefContext(ctx) //nolint:errcheck // the pairs after it would fail too
	cctx, cancel := b.r.opCtx(ctx)
	defer cancel()
	resp, err := b.cli.Get(cctx, b.r.prefix, clientv3.WithPrefix())
	if err != nil {
		return "", err
	}
	for _, kv := range resp.Kvs {
		switch k := string(kv.Key); {
		case strings.HasPrefix(k, b.r.prefix+"ref/hot/"):
			b.refVal = string(kv.Value)
		case k == b.r.prefix+"avail/hot":
			avail = string(kv.Value)
		}
	}
	if b.refVal == "" || avail == "" {
		return "", fmt.Errorf("the store's reference or record of %q was not found under %q", "hot", b.r.prefix)
	}
	return avail, nil
}

// same is the pair with the requests a warm IncRef+DecRef of the store
// sends (etcdstore/refs.go), on plain keys: a Txn comparing the published
// record's mod revision and the absence of an invalidation, putting the
// reference (the store's own value, on the lease) and the access time,
// with the reads of its failure branch; then a Txn deleting the reference
// that also says whether the package was invalidated. Granary's pair against this one is what
// the store's own code costs; this one against pair is what its requests
// ask of etcd beyond the bare minimum.
func (b *rawHot) same(ctx context.Context, i int) (time.Duration, error) {
	k := b.refPfx + "same/" + strconv.Itoa(i)
	t := time.Now()
	cctx, cancel := b.r.opCtx(ctx)
	defer cancel()
	_, err := b.cli.Txn(cctx).
		If(clientv3.Compare(clientv3.ModRevision(b.sameAvail), "=", b.availRev), clientv3.Compare(clientv3.CreateRevision(b.inval), "=", 0)).
		Then(clientv3.OpPut(k, b.refVal, clientv3.WithLease(b.lease)), clientv3.OpPut(b.atime, strconv.FormatInt(t.UnixNano(), 10))).
		Else(clientv3.OpGet(b.build), clientv3.OpGet(b.inval), clientv3.OpGet(b.sameAvail)).
		Commit()
	if err != nil {
		return 0, err
	}
	lat := time.Since(t)
	_, err = b.cli.Txn(cctx).If(clientv3.Compare(clientv3.CreateRevision(b.inval), "=", 0)).
		Then(clientv3.OpDelete(k)).Else(clientv3.OpDelete(k)).Commit()
	return lat, err
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

// side accumulates one contender's rounds at one concurrency level.
type side struct {
	wall  time.Duration
	cpu   time.Duration // the whole process's user+system CPU (etcd included when embedded)
	lats  []time.Duration
	count Counts
}

// round runs n pairs of f on c callers and adds them to sd.
func (r *run) round(ctx context.Context, sd *side, c, n int, f pairFunc) error {
	before, cpu0 := r.cnt.Snapshot(), processCPU()
	wall, lats, err := parallel(ctx, c, n, f)
	if err != nil {
		return err
	}
	sd.wall, sd.cpu, sd.lats = sd.wall+wall, sd.cpu+processCPU()-cpu0, append(sd.lats, lats...)
	sd.count = addCounts(sd.count, r.cnt.Snapshot().Sub(before))
	return nil
}

// hotLevel runs the rounds of concurrency level c, alternating granary's
// pairs, the raw ones and the raw ones with granary's requests, and
// records their rates, their etcd requests and CPU per pair and, when
// latencies is set, the latency quantiles of granary, raw and a single
// Put.
func (r *run) hotLevel(ctx context.Context, c int, latencies bool, granaryPair pairFunc, raw *rawHot) error {
	n := r.z.HotPairs
	var g, rw, same side
	for range r.z.HotRounds {
		for _, x := range []struct {
			sd *side
			f  pairFunc
		}{{&g, granaryPair}, {&rw, raw.pair}, {&same, raw.same}} {
			if err := r.round(ctx, x.sd, c, n, x.f); err != nil {
				return err
			}
		}
	}
	pairs := float64(n * r.z.HotRounds)
	gRate, rRate, sRate := pairs/g.wall.Seconds(), pairs/rw.wall.Seconds(), pairs/same.wall.Seconds()
	req := func(sd side) float64 { return float64(sd.count.Reads+sd.count.Writes) / pairs }
	gReq, rReq := req(g), req(rw)
	us := func(d time.Duration) float64 { return float64(d.Microseconds()) / pairs }
	for k, v := range map[string]float64{
		"hotpath_ops_per_s_c%d": gRate, "hotpath_raw_ops_per_s_c%d": rRate, "hotpath_ratio_c%d": gRate / rRate,
		"hotpath_raw_same_ops_per_s_c%d": sRate, "hotpath_same_ratio_c%d": gRate / sRate,
		"hotpath_etcd_requests_per_pair_c%d": gReq, "hotpath_raw_etcd_requests_per_pair_c%d": rReq,
		"hotpath_raw_same_etcd_requests_per_pair_c%d": req(same),
		"hotpath_cpu_us_per_pair_c%d":                 us(g.cpu), "hotpath_raw_cpu_us_per_pair_c%d": us(rw.cpu),
		"hotpath_raw_same_cpu_us_per_pair_c%d": us(same.cpu),
	} {
		r.res[fmt.Sprintf(k, c)] = v
	}
	r.series.HotConcurrency = append(r.series.HotConcurrency, c)
	r.series.HotGranary = append(r.series.HotGranary, gRate)
	r.series.HotRaw = append(r.series.HotRaw, rRate)
	r.logf("  c=%d: granary %.0f pairs/s, raw %.0f (ratio %.2f), raw with granary's requests %.0f (ratio %.2f); "+
		"CPU per pair %.0f / %.0f / %.0f µs; etcd requests per pair %.2f vs %.2f",
		c, gRate, rRate, gRate/rRate, sRate, gRate/sRate, us(g.cpu), us(rw.cpu), us(same.cpu), gReq, rReq)
	if !latencies {
		return nil
	}
	return r.hotLatencies(ctx, c, g.lats, rw.lats, raw)
}

// hotLatencies records the latency quantiles of granary's IncRef, the raw
// Txn and, measured now, a single raw Put.
func (r *run) hotLatencies(ctx context.Context, c int, gLat, rLat []time.Duration, raw *rawHot) error {
	r.res["hotpath_p50_ms"] = ms(quantile(gLat, 0.5))
	r.res["hotpath_p99_ms"] = ms(quantile(gLat, 0.99))
	r.res["hotpath_raw_txn_p50_ms"] = ms(quantile(rLat, 0.5))
	r.res["hotpath_raw_txn_p99_ms"] = ms(quantile(rLat, 0.99))
	_, puts, err := parallel(ctx, c, r.z.HotPairs*r.z.HotRounds, raw.put)
	if err != nil {
		return err
	}
	r.res["hotpath_raw_put_p50_ms"] = ms(quantile(puts, 0.5))
	r.res["hotpath_raw_put_p99_ms"] = ms(quantile(puts, 0.99))
	r.res["hotpath_latency_concurrency"] = float64(c)
	return nil
}

// processCPU is the user+system CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func addCounts(a, b Counts) Counts {
	return Counts{a.Reads + b.Reads, a.Writes + b.Writes, a.Other + b.Other}
}
