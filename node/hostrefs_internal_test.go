package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

// fakeStore is a refStore in memory: what etcd would hold for one host,
// with knobs for what etcd can do behind the host's back. It checks the
// host references' promises to the store as it goes.
type fakeStore struct {
	mu         sync.Mutex
	avail      map[string]bool // published
	refs       map[string]int  // the host's etcd references, by package
	deleted    map[string]bool // the host's key is gone from etcd (revoked, deleted)
	takes      int             // Take calls that reached "etcd"
	confirms   int
	releases   int
	census     map[string]int // last holder count recorded
	confirmErr error          // a transient error for Confirm, if set
	// gate, if not nil, holds every Take and Confirm until it is closed.
	gate chan struct{}
	t    *testing.T
}

func newFakeStore(t *testing.T, ids ...string) *fakeStore {
	f := &fakeStore{avail: map[string]bool{}, refs: map[string]int{}, deleted: map[string]bool{}, census: map[string]int{}, t: t}
	for _, id := range ids {
		f.avail[id] = true
	}
	return f
}

func (f *fakeStore) wait(ctx context.Context) error {
	f.mu.Lock()
	g := f.gate
	f.mu.Unlock()
	if g == nil {
		return nil
	}
	select {
	case <-g:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeStore) Take(ctx context.Context, id string) error {
	if err := f.wait(ctx); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.takes++
	if !f.avail[id] {
		return fmt.Errorf("take %q: %w", id, core.ErrPackageNotExist)
	}
	f.refs[id]++
	f.deleted[id] = false
	if f.refs[id] > 1 {
		f.t.Errorf("the host holds %d etcd references to %q; want at most one", f.refs[id], id)
	}
	return nil
}

func (f *fakeStore) Release(ctx context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.releases++
	if f.refs[id] == 0 {
		return fmt.Errorf("release %q: %w", id, etcdstore.ErrNoRef)
	}
	f.refs[id]--
	return nil
}

func (f *fakeStore) Proven(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.refs[id] == 1 && !f.deleted[id]
}

// Confirm is the store's: a deleted key is taken again if the package is
// still published, else the reference is lost.
func (f *fakeStore) Confirm(ctx context.Context, id string) error {
	if err := f.wait(ctx); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.confirms++
	switch {
	case f.confirmErr != nil:
		return f.confirmErr
	case f.refs[id] == 0:
		return etcdstore.ErrNoRef
	case !f.deleted[id]:
		return nil
	case f.avail[id]:
		f.deleted[id] = false
		return nil
	}
	return fmt.Errorf("confirm %q: reference lost: %w", id, core.ErrPackageNotExist)
}

func (f *fakeStore) Remove(ctx context.Context, id string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.avail[id] {
		return false, fmt.Errorf("remove %q: %w", id, core.ErrPackageNotExist)
	}
	if f.refs[id] > 0 && !f.deleted[id] {
		return false, nil
	}
	f.avail[id] = false
	return true, nil
}

func (f *fakeStore) Invalid(string) bool { return false }

func (f *fakeStore) RecordHolders(ctx context.Context, id string, n int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.census[id] = n
	return nil
}

// revoke is etcd deleting the host's key behind its back.
func (f *fakeStore) revoke(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.deleted[id] = true
}

// removeElsewhere is another host's removal: it succeeds only when etcd
// holds no reference.
func (f *fakeStore) removeElsewhere(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.refs[id] > 0 && !f.deleted[id] || !f.avail[id] {
		return false
	}
	f.avail[id] = false
	return true
}

func (f *fakeStore) get(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}

const testLinger = 10 * time.Second

func newTestRefs(f refStore, lost func(string, error)) *hostRefs {
	if lost == nil {
		lost = func(string, error) {}
	}
	return newHostRefs(f, testLinger, time.Second, slog.New(slog.DiscardHandler), lost)
}

func mustTake(t *testing.T, h *hostRefs, id string) {
	t.Helper()
	if err := h.take(context.Background(), id); err != nil {
		t.Fatalf("take(%q) = %v", id, err)
	}
}

func TestHostRefsLinger(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		h := newTestRefs(f, nil)
		defer h.close()
		mustTake(t, h, "a")
		if !h.tryFast("a") {
			t.Fatal("tryFast of a proven, held package = false")
		}
		for range 2 {
			if err := h.drop("a"); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(testLinger / 2)
		mustTake(t, h, "a") // within the linger: no etcd call
		if err := h.drop("a"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(testLinger - time.Second)
		synctest.Wait()
		f.get(func() {
			if f.takes != 1 || f.refs["a"] != 1 {
				t.Errorf("before the linger from the last drop: takes %d, refs %d; want 1, 1", f.takes, f.refs["a"])
			}
		})
		time.Sleep(2 * time.Second)
		synctest.Wait()
		f.get(func() {
			if f.refs["a"] != 0 || f.releases != 1 {
				t.Errorf("after the linger: refs %d, releases %d; want 0, 1", f.refs["a"], f.releases)
			}
		})
		if n := len(h.pkgs); n != 0 {
			t.Errorf("%d hostRefs left after the release, want 0", n)
		}
		if err := h.drop("a"); !errors.Is(err, etcdstore.ErrNoRef) {
			t.Errorf("drop without a reference = %v, want ErrNoRef", err)
		}
	})
}

// A warm pair (a grant, then its drop) arms no timer of its own: the
// linger timer the first drop armed stays armed through the pairs, and
// releases the linger after the last drop, not after the first.
func TestHostRefsWarmPairsKeepOneTimer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		h := newTestRefs(f, nil)
		defer h.close()
		mustTake(t, h, "a")
		if err := h.drop("a"); err != nil {
			t.Fatal(err)
		}
		timer := func() *time.Timer {
			h.mu.Lock()
			defer h.mu.Unlock()
			return h.pkgs["a"].timer
		}
		armed := timer()
		if armed == nil {
			t.Fatal("no linger timer after the last drop")
		}
		// Pairs at 0.4, 0.8 and 1.2 lingers: never at the instant the
		// first drop's timer fires (1 linger), where which of the two
		// runs first is not decided (a timer that finds the package held
		// retires, and the next drop arms a new one).
		for range 3 {
			time.Sleep(testLinger * 2 / 5)
			for range 100 {
				if !h.tryFast("a") {
					t.Fatal("tryFast of a held, proven package = false")
				}
				if err := h.drop("a"); err != nil {
					t.Fatal(err)
				}
			}
			if timer() != armed {
				t.Fatal("warm pairs armed a timer of their own")
			}
		}
		time.Sleep(testLinger - time.Second)
		synctest.Wait()
		f.get(func() {
			if f.refs["a"] != 1 || f.releases != 0 {
				t.Errorf("within the linger from the last drop: refs %d, releases %d; want 1, 0", f.refs["a"], f.releases)
			}
		})
		time.Sleep(2 * time.Second)
		synctest.Wait()
		f.get(func() {
			if f.refs["a"] != 0 || f.releases != 1 {
				t.Errorf("after the linger from the last drop: refs %d, releases %d; want 0, 1", f.refs["a"], f.releases)
			}
		})
	})
}

func TestHostRefsConcurrentTakesShareOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		f.gate = make(chan struct{})
		h := newTestRefs(f, nil)
		defer h.close()
		var wg sync.WaitGroup
		for range 5 {
			wg.Go(func() { mustTake(t, h, "a") })
		}
		synctest.Wait() // all five waiting: one in Take, four on busy
		// A removal through the node while the Take is on its way: in use.
		if ok, err := h.remove(context.Background(), "a"); ok || err != nil {
			t.Fatalf("remove while a take is on its way = %v, %v; want false, nil", ok, err)
		}
		close(f.gate)
		wg.Wait()
		holders, etcd := h.state("a")
		f.get(func() {
			if f.takes != 1 || holders != 5 || !etcd {
				t.Errorf("takes %d, holders %d, etcd %v; want 1, 5, true", f.takes, holders, etcd)
			}
			if !f.avail["a"] {
				t.Error("a removal through the node while a take was on its way removed the package")
			}
		})
	})
}

func TestHostRefsYield(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "idle", "held")
		h := newTestRefs(f, nil)
		defer h.close()
		for _, id := range []string{"idle", "held", "held"} {
			mustTake(t, h, id)
		}
		if err := h.drop("idle"); err != nil {
			t.Fatal(err)
		}
		h.yield("idle", "host-b")
		h.yield("held", "host-b")
		synctest.Wait()
		f.get(func() {
			if f.refs["idle"] != 0 {
				t.Error("a lingering reference was not yielded")
			}
			if f.refs["held"] != 1 || f.census["held"] != 2 {
				t.Errorf("held: refs %d, recorded holders %d; want 1, 2", f.refs["held"], f.census["held"])
			}
		})
		// The yielded package's linger timer must not release again.
		time.Sleep(2 * testLinger)
		synctest.Wait()
		f.get(func() {
			if f.releases != 1 {
				t.Errorf("releases %d, want 1", f.releases)
			}
		})
	})
}

// The host's key is deleted behind its back (lease revoked) and the
// package removed elsewhere: a job that starts is refused, a job that held
// it is told, and no etcd reference is left.
func TestHostRefsDeletedKeyThenRemoved(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		var told []string
		h := newTestRefs(f, func(id string, _ error) { told = append(told, id) })
		defer h.close()
		mustTake(t, h, "a")
		f.revoke("a")
		if h.tryFast("a") {
			t.Fatal("tryFast granted a reference whose key etcd deleted")
		}
		if !f.removeElsewhere("a") {
			t.Fatal("the removal elsewhere was refused")
		}
		err := h.take(context.Background(), "a")
		if !errors.Is(err, core.ErrPackageNotExist) {
			t.Fatalf("take after the removal = %v; want ErrPackageNotExist", err)
		}
		// The store reports the loss to the holders too.
		h.refLost("a", errors.New("gone"))
		synctest.Wait()
		if len(told) != 1 {
			t.Errorf("holders told %d times, want 1", len(told))
		}
		if err := h.drop("a"); err != nil {
			t.Fatalf("drop of the held reference after its loss = %v", err)
		}
		time.Sleep(2 * testLinger)
		synctest.Wait()
		f.get(func() {
			if f.refs["a"] != 0 {
				t.Errorf("etcd references left: %d", f.refs["a"])
			}
		})
		if n := len(h.pkgs); n != 0 {
			t.Errorf("%d hostRefs left, want 0", n)
		}
	})
}

// A deleted key whose package is still there is confirmed (the store takes
// it again) without a second Take.
func TestHostRefsDeletedKeyConfirmed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		h := newTestRefs(f, nil)
		defer h.close()
		mustTake(t, h, "a")
		f.revoke("a")
		mustTake(t, h, "a")
		f.get(func() {
			if f.takes != 1 || f.confirms != 1 {
				t.Errorf("takes %d, confirms %d; want 1, 1", f.takes, f.confirms)
			}
		})
	})
}

// A Confirm that fails for a passing reason (etcd away) while no job holds
// the package must not strand the etcd reference without its linger: a
// linger timer that fired while the confirm was under way did nothing.
func TestHostRefsFailedConfirmKeepsLinger(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "a")
		h := newTestRefs(f, nil)
		defer h.close()
		mustTake(t, h, "a")
		if err := h.drop("a"); err != nil {
			t.Fatal(err)
		}
		f.revoke("a")
		f.gate = make(chan struct{})
		f.confirmErr = errors.New("etcd away")
		errc := make(chan error, 1)
		time.Sleep(testLinger - time.Second)
		go func() { errc <- h.take(context.Background(), "a") }()
		synctest.Wait()
		time.Sleep(2 * time.Second) // the linger fires while the confirm waits
		synctest.Wait()
		close(f.gate)
		if err := <-errc; err == nil {
			t.Fatal("take with a failing confirm = nil")
		}
		time.Sleep(2 * testLinger)
		synctest.Wait()
		f.get(func() {
			if f.refs["a"] != 0 {
				t.Errorf("the etcd reference stayed after a failed confirm and the linger (refs %d)", f.refs["a"])
			}
		})
	})
}

func TestHostRefsRemove(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFakeStore(t, "lingering", "held")
		h := newTestRefs(f, nil)
		defer h.close()
		mustTake(t, h, "lingering")
		mustTake(t, h, "held")
		if err := h.drop("lingering"); err != nil {
			t.Fatal(err)
		}
		if ok, err := h.remove(context.Background(), "held"); ok || err != nil {
			t.Errorf("remove of a held package = %v, %v; want false, nil", ok, err)
		}
		if ok, err := h.remove(context.Background(), "lingering"); !ok || err != nil {
			t.Errorf("remove of a lingering package = %v, %v; want true, nil", ok, err)
		}
		time.Sleep(2 * testLinger)
		synctest.Wait()
		f.get(func() {
			if f.releases != 1 || f.refs["lingering"] != 0 {
				t.Errorf("releases %d, refs %d; want 1, 0", f.releases, f.refs["lingering"])
			}
		})
	})
}

// A random walk over every operation the host references see (takes,
// drops, linger expiry, yields, removals elsewhere, deleted keys, losses)
// checks, after each step, that a granted reference is to a package etcd
// still has and holds, and at the end that nothing is left in etcd.
func TestHostRefsRandomWalk(t *testing.T) {
	for seed := range uint64(50) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				rng := rand.New(rand.NewPCG(seed, 1))
				ids := []string{"a", "b"}
				f := newFakeStore(t, ids...)
				h := newTestRefs(f, nil)
				held := map[string]int{}
				for step := range 200 {
					id := ids[rng.IntN(len(ids))]
					switch op := rng.IntN(8); op {
					case 0, 1:
						err := h.take(context.Background(), id)
						if err == nil {
							held[id]++
							f.get(func() {
								if !f.avail[id] || f.refs[id] != 1 || f.deleted[id] {
									t.Fatalf("step %d: granted %q while etcd has avail=%v refs=%d deleted=%v",
										step, id, f.avail[id], f.refs[id], f.deleted[id])
								}
							})
						} else if !errors.Is(err, core.ErrPackageNotExist) {
							t.Fatalf("step %d: take = %v", step, err)
						}
					case 2, 3:
						if held[id] > 0 {
							held[id]--
							if err := h.drop(id); err != nil {
								t.Fatalf("step %d: drop = %v", step, err)
							}
						}
					case 4:
						time.Sleep(time.Duration(rng.IntN(int(2 * testLinger))))
					case 5:
						h.yield(id, "other")
					case 6:
						f.revoke(id)
					case 7:
						if f.removeElsewhere(id) {
							// The store would find the loss when it takes
							// the reference again, and report it.
							h.refLost(id, errors.New("removed elsewhere"))
						} else {
							f.get(func() {
								if !f.avail[id] {
									f.avail[id] = true // rebuilt
								}
							})
						}
					}
					synctest.Wait()
				}
				for id, n := range held {
					for range n {
						if err := h.drop(id); err != nil {
							t.Fatalf("final drop %q = %v", id, err)
						}
					}
				}
				time.Sleep(2 * testLinger)
				synctest.Wait()
				f.get(func() {
					for _, id := range ids {
						if f.refs[id] != 0 {
							t.Errorf("%q: %d etcd references left after every job ended and the linger passed", id, f.refs[id])
						}
					}
				})
				h.close()
			})
		})
	}
}
