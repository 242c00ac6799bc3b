package etcdstore_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// graphHistory is history over packages that need packages, with pins and
// invalidations. Its invariants:
//
//   - no package in the closure of a held or pinned package is removed:
//     a holder reads its package's tree and every need's, twice, and a
//     removal that succeeds while the package or a dependent of it is held
//     or pinned is a violation;
//   - no reference is granted on an invalidated tree: an IncRef that
//     started after an invalidation returned and yields a tree whose digest
//     that invalidation named is a violation.
type graphHistory struct {
	*history
	needs map[string][]string // the fixed graph
	store *etcdstore.Store    // for reading records

	gmu        sync.Mutex
	pinned     map[string]int
	badDigests map[string]time.Time // digest → when its invalidation returned
	counts     map[string]int
}

// dependentsOf returns id and every package whose closure contains it.
func (g *graphHistory) dependentsOf(id string) []string {
	out := []string{id}
	for p, ns := range g.needs {
		for _, n := range ns {
			if n == id {
				out = append(out, g.dependentsOf(p)...)
			}
		}
	}
	return out
}

func (g *graphHistory) count(what string) {
	g.gmu.Lock()
	g.counts[what]++
	g.gmu.Unlock()
}

func (g *graphHistory) step(s *etcdstore.Store, rng *mrand.Rand) {
	g.ops.Add(1)
	id := g.ids[rng.IntN(len(g.ids))]
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	switch n := rng.IntN(20); {
	case n < 7:
		g.build(ctx, s, id, rng)
	case n < 14:
		g.hold(ctx, s, id, rng)
	case n < 16:
		g.remove(ctx, s, id)
	case n < 18:
		g.pin(ctx, s, id, rng)
	case n < 19:
		g.invalidate(ctx, s, id)
	default:
		if _, err := s.Prune(ctx, etcdstore.PruneOptions{OlderThan: etcdstore.AnyAge, Grace: etcdstore.NoGrace}); err != nil && !errors.Is(err, etcdstore.ErrCollectorBusy) {
			g.fail("prune: %v", err)
		}
		if _, err := s.SweepInvalid(ctx); err != nil {
			g.fail("sweep invalid: %v", err)
		}
	}
}

func (g *graphHistory) build(ctx context.Context, s *etcdstore.Store, id string, rng *mrand.Rand) {
	h := s.Handle(id)
	err := h.BuildNeeds(ctx, g.needs[id], func(ctx context.Context) error {
		if n := g.add(g.running, id, 1); n > 1 {
			g.violate("%d builders of %s at once", n, id)
		}
		defer g.add(g.running, id, -1)
		for _, n := range core.NeedsOf(ctx) {
			if _, err := os.ReadFile(filepath.Join(n.Dir, "f")); err != nil {
				g.violate("builder of %s cannot read its need %s: %v", id, n.ID, err)
			}
		}
		time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id+" "+rand.Text()), 0o644)
	})
	switch {
	case err == nil:
	case errors.Is(err, core.ErrPackageNotExist):
		// A need is gone or invalid: refused before the builder ran.
	case errors.Is(err, core.ErrBuildFailed) && strings.Contains(err.Error(), "invalidated"):
		// A need was invalidated while the builder ran: the publish was
		// refused (this store's attempt, or the one it waited for).
		g.count("refused at publish")
	default:
		g.fail("build %s: %v", id, err)
	}
}

func (g *graphHistory) hold(ctx context.Context, s *etcdstore.Store, id string, rng *mrand.Rand) {
	h := s.Handle(id)
	start := time.Now()
	if err := h.IncRefContext(ctx); err != nil {
		if !errors.Is(err, core.ErrPackageNotExist) {
			g.fail("incref %s: %v", id, err)
		}
		return
	}
	g.count("held")
	g.add(g.held, id, 1)
	digest, _, err := etcdstore.TreeDigest(h.OutputDirectory())
	if err != nil {
		g.violate("holder of %s cannot digest its tree: %v", id, err)
	}
	g.gmu.Lock()
	if at, bad := g.badDigests[digest]; bad && start.After(at) {
		g.violate("incref %s granted an invalidated tree (%s, invalidated %v before the incref started)", id, digest, start.Sub(at))
	}
	g.gmu.Unlock()
	for range 2 {
		g.readClosure(s, id, id)
		time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
	}
	g.add(g.held, id, -1)
	if err := h.DecRefContext(ctx); err != nil {
		g.fail("decref %s: %v", id, err)
	}
}

// readClosure reads the tree of id and of its needs, recursively.
func (g *graphHistory) readClosure(s *etcdstore.Store, held, id string) {
	b, err := os.ReadFile(filepath.Join(s.Handle(id).OutputDirectory(), "f"))
	if err != nil || len(b) < len(id) || string(b[:len(id)]) != id {
		g.violate("holder of %s reads %s's tree: %q, %v", held, id, b, err)
	}
	for _, n := range g.needs[id] {
		g.readClosure(s, held, n)
	}
}

func (g *graphHistory) remove(ctx context.Context, s *etcdstore.Store, id string) {
	ok, err := s.Handle(id).TryRemoveContext(ctx)
	if err != nil && !errors.Is(err, core.ErrPackageNotExist) {
		g.fail("remove %s: %v", id, err)
	}
	if !ok {
		return
	}
	g.count("removed")
	for _, d := range g.dependentsOf(id) {
		g.gmu.Lock()
		pinned := g.pinned[d] > 0
		g.gmu.Unlock()
		if g.add(g.held, d, 0) > 0 || pinned {
			g.violate("remove %s succeeded while %s (itself or a dependent) was held or pinned", id, d)
		}
	}
}

func (g *graphHistory) pin(ctx context.Context, s *etcdstore.Store, id string, rng *mrand.Rand) {
	if _, err := s.Pin(ctx, id, etcdstore.PinOptions{By: "history"}); err != nil {
		if !errors.Is(err, core.ErrPackageNotExist) {
			g.fail("pin %s: %v", id, err)
		}
		return
	}
	g.count("pinned")
	g.gmu.Lock()
	g.pinned[id]++
	g.gmu.Unlock()
	time.Sleep(time.Duration(rng.IntN(20)) * time.Millisecond)
	g.gmu.Lock()
	g.pinned[id]--
	g.gmu.Unlock()
	// Another worker may have pinned it too (the last pin wins the key):
	// unpin only when nobody counts on it.
	g.gmu.Lock()
	last := g.pinned[id] == 0
	if last {
		g.pinned[id] = -1000 // nobody pins while we unpin
	}
	g.gmu.Unlock()
	if last {
		if _, err := s.Unpin(ctx, id); err != nil {
			g.fail("unpin %s: %v", id, err)
		}
		g.gmu.Lock()
		g.pinned[id] += 1000
		g.gmu.Unlock()
	}
}

func (g *graphHistory) invalidate(ctx context.Context, s *etcdstore.Store, id string) {
	rep, err := s.Invalidate(ctx, id, "history", "t")
	if err != nil {
		if !errors.Is(err, core.ErrPackageNotExist) {
			g.fail("invalidate %s: %v", id, err)
		}
		return
	}
	g.count("invalidated")
	at := time.Now()
	for _, p := range rep.Invalidated {
		info, err := g.store.Inspect(ctx, p)
		if err != nil {
			g.fail("inspect %s: %v", p, err)
			continue
		}
		for _, r := range []*etcdstore.InvalidRecord{info.Invalid, info.Invalidated} {
			if r != nil && r.Digest != "" {
				g.gmu.Lock()
				if _, ok := g.badDigests[r.Digest]; !ok {
					g.badDigests[r.Digest] = at
				}
				g.gmu.Unlock()
			}
		}
	}
}

// TestRandomGraphHistory: 3 stores × 3 goroutines over a small graph of
// needs (base0, base1 ← mid0, mid1 ← top), with holds, removals, pins,
// invalidations and sweeps.
func TestRandomGraphHistory(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	var stores []*etcdstore.Store
	for i := range 3 {
		stores = append(stores, newStore(t, srv, root, etcdstore.WithHost(fmt.Sprintf("host-%d", i))))
	}
	g := &graphHistory{
		history: newHistory("base0", "base1", "mid0", "mid1", "top"),
		needs:   map[string][]string{"mid0": {"base0"}, "mid1": {"base0", "base1"}, "top": {"mid0", "mid1"}},
		store:   stores[0], pinned: map[string]int{}, badDigests: map[string]time.Time{}, counts: map[string]int{},
	}
	// As a node does: invalid packages go as soon as nothing holds them
	// (a build of one waits for that).
	sweepCtx, stopSweep := context.WithCancel(context.Background())
	swept := make(chan struct{})
	go func() { defer close(swept); stores[1].WatchInvalid(sweepCtx) }()
	defer func() { stopSweep(); <-swept }()
	var wg sync.WaitGroup
	for si, s := range stores {
		for w := range 3 {
			rng := mrand.New(mrand.NewPCG(uint64(si), uint64(w)+100))
			wg.Go(func() {
				for range 60 {
					g.step(s, rng)
				}
			})
		}
	}
	wg.Wait()
	t.Logf("%d operations: %v; %d violations, %d failed", g.ops.Load(), g.counts, g.violations.Load(), g.failed.Load())
	for _, e := range g.errs {
		t.Log(e)
	}
	if g.violations.Load() > 0 || g.failed.Load() > 0 {
		t.Errorf("%d violations and %d failed operations, want none", g.violations.Load(), g.failed.Load())
	}
	for _, what := range []string{"held", "removed", "pinned", "invalidated"} {
		if g.counts[what] == 0 {
			t.Errorf("no %s operation succeeded: the history did not exercise it", what)
		}
	}
}
