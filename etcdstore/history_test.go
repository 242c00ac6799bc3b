package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// history runs a randomized mix of builds, holds (IncRef, read the tree
// twice, DecRef) and removals from several goroutines on several stores,
// and counts what the store's invariants forbid:
//
//   - two builders of one ID running at once (anywhere);
//   - a removal that succeeds while a holder has the package;
//   - an IncRef that succeeds while this store's host cannot read the
//     published tree (through its own root);
//
// and the operations that failed for any reason but "does not exist".
type history struct {
	ids        []string
	ops        atomic.Int64
	failed     atomic.Int64
	violations atomic.Int64

	mu      sync.Mutex
	running map[string]int // builders running, by ID
	held    map[string]int // holders, by ID
	errs    []string
}

func newHistory(ids ...string) *history {
	return &history{ids: ids, running: map[string]int{}, held: map[string]int{}}
}

func (h *history) violate(format string, args ...any) {
	h.violations.Add(1)
	h.note(format, args...)
}

func (h *history) fail(format string, args ...any) {
	h.failed.Add(1)
	h.note(format, args...)
}

func (h *history) note(format string, args ...any) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.errs) < 20 {
		h.errs = append(h.errs, fmt.Sprintf(format, args...))
	}
}

func (h *history) add(m map[string]int, id string, d int) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	m[id] += d
	return m[id]
}

// run makes workers goroutines per store do ops operations each.
func (h *history) run(t *testing.T, stores []*etcdstore.Store, workers, ops int) {
	var wg sync.WaitGroup
	for si, s := range stores {
		for w := range workers {
			rng := rand.New(rand.NewPCG(uint64(si), uint64(w)))
			wg.Go(func() {
				for range ops {
					h.step(s, rng)
				}
			})
		}
	}
	wg.Wait()
	t.Logf("%d operations on %d stores: %d violations, %d failed", h.ops.Load(), len(stores), h.violations.Load(), h.failed.Load())
	for _, e := range h.errs {
		t.Log(e)
	}
	if h.violations.Load() > 0 || h.failed.Load() > 0 {
		t.Errorf("%d violations and %d failed operations, want none", h.violations.Load(), h.failed.Load())
	}
}

func (h *history) step(s *etcdstore.Store, rng *rand.Rand) {
	h.ops.Add(1)
	id := h.ids[rng.IntN(len(h.ids))]
	p := s.Handle(id)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	switch n := rng.IntN(10); {
	case n < 4:
		h.build(ctx, p, rng)
	case n < 8:
		h.hold(ctx, p, rng)
	default:
		if ok, err := p.TryRemoveContext(ctx); err != nil && !errors.Is(err, core.ErrPackageNotExist) {
			h.fail("remove %s: %v", id, err)
		} else if ok && h.add(h.held, id, 0) > 0 {
			h.violate("remove %s succeeded while it was held", id)
		}
	}
}

func (h *history) build(ctx context.Context, p *etcdstore.Handle, rng *rand.Rand) {
	id := p.ID()
	_, err := p.BuildOutcome(ctx, func(ctx context.Context) error {
		if n := h.add(h.running, id, 1); n > 1 {
			h.violate("%d builders of %s at once", n, id)
		}
		defer h.add(h.running, id, -1)
		time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
		return os.WriteFile(filepath.Join(p.OutputDirectory(), "f"), []byte(id), 0o644)
	})
	if err != nil {
		h.fail("build %s: %v", id, err)
		return
	}
	// The package may be removed right after Build returns: only a holder
	// may insist on reading it.
}

func (h *history) hold(ctx context.Context, p *etcdstore.Handle, rng *rand.Rand) {
	id := p.ID()
	if err := p.IncRefContext(ctx); err != nil {
		if !errors.Is(err, core.ErrPackageNotExist) {
			h.fail("incref %s: %v", id, err)
		}
		return
	}
	h.add(h.held, id, 1)
	for range 2 {
		b, err := os.ReadFile(filepath.Join(p.OutputDirectory(), "f"))
		if err != nil || string(b) != id {
			h.violate("holder of %s reads %q, %v", id, b, err)
			break
		}
		time.Sleep(time.Duration(rng.IntN(3)) * time.Millisecond)
	}
	h.add(h.held, id, -1)
	if err := p.DecRefContext(ctx); err != nil {
		h.fail("decref %s: %v", id, err)
	}
}

// TestRandomHistory: 4 stores × 4 goroutines on one root and one etcd.
func TestRandomHistory(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	var stores []*etcdstore.Store
	for i := range 4 {
		stores = append(stores, newStore(t, srv, root, etcdstore.WithHost(fmt.Sprintf("host-%d", i))))
	}
	newHistory("a", "b", "c").run(t, stores, 4, 40)
}
