package bench

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
)

// needCounts are the sizes of a package's needs the needs scenario
// measures.
var needCounts = []int{0, 5, 20}

// needs measures what declared needs cost: IncRef+DecRef pairs on a
// package with 0, 5 and 20 needs, direct and through the host agent (warm),
// with the etcd writes per pair; and the removal of such a package. A
// reference protects the closure through the need edges, so neither pair
// should depend on the count; a removal deletes one edge per need in its
// Txn.
func (r *run) needs(ctx context.Context) error {
	s, _, err := r.store(ctx, "needs-host")
	if err != nil {
		return err
	}
	c := r.z.HotConcurrency[len(r.z.HotConcurrency)-1]
	for _, k := range needCounts {
		id, err := r.publishNeeding(ctx, s, k)
		if err != nil {
			return err
		}
		h := s.Handle(id)
		pair := func(ctx context.Context, _ int) (time.Duration, error) {
			t := time.Now()
			if err := h.IncRefContext(ctx); err != nil {
				return 0, err
			}
			return time.Since(t), h.DecRefContext(ctx)
		}
		n := r.z.HotPairs * r.z.HotRounds
		before := r.cnt.Snapshot()
		wall, _, err := parallel(ctx, c, n, pair)
		if err != nil {
			return err
		}
		cnt := r.cnt.Snapshot().Sub(before)
		r.res[fmt.Sprintf("needs_%d_ops_per_s_c%d", k, c)] = float64(n) / wall.Seconds()
		r.res[fmt.Sprintf("needs_%d_etcd_writes_per_pair", k)] = float64(cnt.Writes) / float64(n)
		r.logf("  %d needs, direct, c=%d: %.0f pairs/s, etcd writes per pair %.2f", k, c, float64(n)/wall.Seconds(), float64(cnt.Writes)/float64(n))
	}
	// Removals first: the agent's host references, on s, would keep the
	// packages afterwards.
	if err := r.needsRemove(ctx, s); err != nil {
		return err
	}
	return r.needsAgent(ctx, s, c)
}

// publishNeeding publishes needs-<k> with k needs of its own and returns
// its ID.
func (r *run) publishNeeding(ctx context.Context, s *etcdstore.Store, k int) (string, error) {
	id := "needs-" + strconv.Itoa(k)
	var needs []string
	for i := range k {
		need := id + "-need-" + strconv.Itoa(i)
		if err := s.Handle(need).BuildContext(ctx, func(context.Context) error { return nil }); err != nil {
			return "", err
		}
		needs = append(needs, need)
	}
	err := s.Handle(id).BuildNeeds(ctx, needs, func(context.Context) error { return nil })
	return id, err
}

// needsAgent is the warm pair through a host agent on s, for each count.
func (r *run) needsAgent(ctx context.Context, s *etcdstore.Store, c int) error {
	state, stop, err := r.localAPI(ctx, s, "needs-host")
	if err != nil {
		return err
	}
	defer stop()
	warm, err := agent.Connect(ctx, state)
	if err != nil {
		return err
	}
	defer warm.Close()
	for _, k := range needCounts {
		id := "needs-" + strconv.Itoa(k)
		if err := warm.Handle(id).IncRefContext(ctx); err != nil { // the host holds it from now on
			return err
		}
		r.logf("  %d needs, through the agent (warm):", k)
		if err := r.agentPairs(ctx, state, id, c, fmt.Sprintf("needs_%d_agent", k)); err != nil {
			return err
		}
	}
	return nil
}

// needsRemove times TryRemove of a package with each count of needs, and
// its etcd requests, over HotRounds removals (each followed, untimed, by
// its publish again).
func (r *run) needsRemove(ctx context.Context, s *etcdstore.Store) error {
	for _, k := range needCounts {
		id := "needs-" + strconv.Itoa(k)
		var needs []string
		for i := range k {
			needs = append(needs, id+"-need-"+strconv.Itoa(i))
		}
		var took time.Duration
		var cnt Counts
		rounds := max(r.z.HotRounds, 5)
		for range rounds {
			before := r.cnt.Snapshot()
			t := time.Now()
			ok, err := s.Handle(id).TryRemoveContext(ctx)
			took += time.Since(t)
			cnt = addCounts(cnt, r.cnt.Snapshot().Sub(before))
			if err != nil || !ok {
				return fmt.Errorf("remove %s: %v, %w", id, ok, err)
			}
			if err := s.Handle(id).BuildNeeds(ctx, needs, func(context.Context) error { return nil }); err != nil {
				return err
			}
		}
		r.res[fmt.Sprintf("needs_%d_remove_ms", k)] = ms(took / time.Duration(rounds))
		r.res[fmt.Sprintf("needs_%d_remove_etcd_requests", k)] = float64(cnt.Reads+cnt.Writes) / float64(rounds)
		r.logf("  remove with %d needs: %.2f ms, %.1f etcd requests", k, ms(took/time.Duration(rounds)), float64(cnt.Reads+cnt.Writes)/float64(rounds))
	}
	return nil
}
