package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// twoHosts returns two stores on one etcd and one root, as two hosts.
func twoHosts(t *testing.T) (a, b *etcdstore.Store) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	return newStore(t, srv, root, etcdstore.WithHost("host-a")), newStore(t, srv, root, etcdstore.WithHost("host-b"))
}

// buildOn builds id with needs, writing a file that names them.
func buildOn(t *testing.T, s *etcdstore.Store, id string, needs ...string) {
	t.Helper()
	h := s.Handle(id)
	err := h.BuildNeeds(context.Background(), needs, func(ctx context.Context) error {
		var got []string
		for _, n := range core.NeedsOf(ctx) {
			if _, err := os.Stat(n.Dir); err != nil {
				return err
			}
			got = append(got, n.ID)
		}
		if !slices.Equal(got, needs) {
			return errors.New("builder saw needs " + strings.Join(got, ",") + ", want " + strings.Join(needs, ","))
		}
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id), 0o644)
	})
	if err != nil {
		t.Fatalf("build %s needing %v: %v", id, needs, err)
	}
}

func TestHeldDependentProtectsItsClosure(t *testing.T) {
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "toolchain")
	buildOn(t, a, "env", "toolchain")
	buildOn(t, a, "app", "env")
	if err := a.Handle("app").IncRef(); err != nil {
		t.Fatal(err)
	}
	// Neither a need nor a need's need can go, from any host, whoever
	// holds what; gc of everything leaves the three.
	for _, id := range []string{"toolchain", "env"} {
		if ok, err := b.Handle(id).TryRemove(); ok || err != nil {
			t.Fatalf("remove %s while app is held = %v, %v; want refused", id, ok, err)
		}
	}
	rep, err := b.Prune(ctx, etcdstore.PruneOptions{OlderThan: etcdstore.AnyAge, Grace: etcdstore.NoGrace})
	if err != nil || len(rep.Removed) != 0 {
		t.Fatalf("gc while app is held removed %v, %v; want nothing", ids(rep.Removed), err)
	}
	info, err := b.Inspect(ctx, "toolchain")
	if err != nil || !slices.Equal(info.NeededBy, []string{"env"}) {
		t.Fatalf("toolchain needed by %v, %v; want [env]", info.NeededBy, err)
	}
	if err := a.Handle("app").DecRef(); err != nil {
		t.Fatal(err)
	}
	// Unheld, still needed: rm of a need is refused.
	if ok, err := b.Handle("toolchain").TryRemove(); ok || err != nil {
		t.Fatalf("remove toolchain needed by env = %v, %v; want refused", ok, err)
	}
	// One sweep removes the dependent, then what it needed, down the chain.
	rep, err = b.Prune(ctx, etcdstore.PruneOptions{OlderThan: etcdstore.AnyAge, Grace: etcdstore.NoGrace})
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(rep.Removed); !slices.Equal(got, []string{"app", "env", "toolchain"}) {
		t.Fatalf("gc removed %v; want app, env and toolchain in one sweep (kept: %+v)", got, rep.Kept)
	}
}

func TestBuildNeedsMissingNeed(t *testing.T) {
	a, _ := twoHosts(t)
	var ran atomic.Bool
	err := a.Handle("env").BuildNeeds(context.Background(), []string{"nope"}, func(context.Context) error { ran.Store(true); return nil })
	var ne *etcdstore.NeedError
	if !errors.Is(err, core.ErrPackageNotExist) || !errors.As(err, &ne) || ne.Need != "nope" || ran.Load() {
		t.Fatalf("build needing a missing package = %v (builder ran: %v); want a NeedError naming it", err, ran.Load())
	}
	if err := a.Handle("env").BuildNeeds(context.Background(), []string{"env"}, func(context.Context) error { return nil }); !errors.Is(err, core.ErrInvalidID) {
		t.Fatalf("build needing itself = %v; want ErrInvalidID", err)
	}
}

func TestBuildNeedsWaitsForNeedBeingBuilt(t *testing.T) {
	a, b := twoHosts(t)
	release := make(chan struct{})
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		h := a.Handle("toolchain")
		done <- h.Build(func() error {
			close(started)
			<-release
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "cc"), nil, 0o644)
		})
	}()
	<-started
	envDone := make(chan error, 1)
	go func() {
		envDone <- b.Handle("env").BuildNeeds(context.Background(), []string{"toolchain"}, func(ctx context.Context) error {
			if _, err := os.Stat(filepath.Join(core.NeedsOf(ctx)[0].Dir, "cc")); err != nil {
				return err
			}
			return nil
		})
	}()
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := <-envDone; err != nil {
		t.Fatalf("build of env that waited for its need = %v", err)
	}
}

func TestPinBlocksRemovalUntilUnpinnedOrExpired(t *testing.T) {
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "base")
	buildOn(t, a, "top", "base")
	if _, err := a.Pin(ctx, "top", etcdstore.PinOptions{Note: "release 1.2", By: "alice"}); err != nil {
		t.Fatal(err)
	}
	all := etcdstore.PruneOptions{OlderThan: etcdstore.AnyAge, Grace: etcdstore.NoGrace}
	for _, id := range []string{"top", "base"} {
		if ok, err := b.Handle(id).TryRemove(); ok || err != nil {
			t.Fatalf("remove %s with top pinned = %v, %v; want refused", id, ok, err)
		}
	}
	if rep, err := b.Prune(ctx, all); err != nil || len(rep.Removed) != 0 {
		t.Fatalf("gc with top pinned removed %v, %v", ids(rep.Removed), err)
	}
	info, err := b.Inspect(ctx, "top")
	if err != nil || info.Pin == nil || info.Pin.By != "alice" || info.Pin.Note != "release 1.2" || info.Pin.Host != "host-a" {
		t.Fatalf("inspect top: pin %+v, %v", info.Pin, err)
	}
	if ok, err := b.Unpin(ctx, "top"); !ok || err != nil {
		t.Fatalf("unpin = %v, %v", ok, err)
	}
	// An expiring pin: in force, then not.
	if _, err := a.Pin(ctx, "top", etcdstore.PinOptions{For: 300 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.Handle("top").TryRemove(); ok || err != nil {
		t.Fatalf("remove top within its pin = %v, %v; want refused", ok, err)
	}
	time.Sleep(400 * time.Millisecond) // the pin's own time must pass: expiry is by the clock
	rep, err := b.Prune(ctx, all)
	if err != nil || !slices.Equal(ids(rep.Removed), []string{"base", "top"}) {
		t.Fatalf("gc after the pin expired removed %v, %v; want base and top", ids(rep.Removed), err)
	}
	if _, err := a.Pin(ctx, "top", etcdstore.PinOptions{}); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("pin of a removed package = %v; want ErrPackageNotExist", err)
	}
}

func TestInvalidate(t *testing.T) {
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "lib")
	buildOn(t, a, "app", "lib")
	buildOn(t, a, "other")
	if err := b.Handle("app").IncRef(); err != nil { // a job on host b holds app
		t.Fatal(err)
	}
	rep, err := a.Invalidate(ctx, "lib", "CVE-2026-1234", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Invalidated, []string{"app", "lib"}) || len(rep.Removed) != 0 || !slices.Equal(rep.Held, []string{"app", "lib"}) {
		t.Fatalf("invalidate = %+v; want app then lib invalidated, both held", rep)
	}
	// No new reference on either, with the reason; the job keeps its own.
	for _, id := range []string{"lib", "app"} {
		err := a.Handle(id).IncRef()
		if !errors.Is(err, core.ErrInvalidated) || !errors.Is(err, core.ErrPackageNotExist) || !strings.Contains(err.Error(), "CVE-2026-1234") || !strings.Contains(err.Error(), "alice") {
			t.Fatalf("incref %s after invalidation = %v; want ErrInvalidated naming alice and the reason", id, err)
		}
	}
	if err := a.Handle("other").IncRef(); err != nil {
		t.Fatalf("an unrelated package: %v", err)
	}
	// A build of lib now waits for its removal, then builds anew.
	var rebuilt atomic.Int32
	built := make(chan error, 1)
	go func() {
		h := a.Handle("lib")
		built <- h.Build(func() error {
			rebuilt.Add(1)
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("fixed"), 0o644)
		})
	}()
	// The job leaves: its DecRef removes app, then lib, which app alone
	// kept.
	if err := b.Handle("app").DecRef(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"app", "lib"} {
		if info, err := b.Inspect(ctx, id); err != nil || info.Package != nil && info.Invalid != nil {
			t.Fatalf("%s after its last holder left: %+v, %v; want removed", id, info, err)
		}
	}
	if err := <-built; err != nil || rebuilt.Load() != 1 {
		t.Fatalf("build of lib after its invalidation = %v, builder ran %d times; want once", err, rebuilt.Load())
	}
	info, err := b.Inspect(ctx, "lib")
	if err != nil || info.State != etcdstore.StateAvailable || info.Invalid != nil || info.Invalidated == nil || info.Invalidated.Reason != "CVE-2026-1234" {
		t.Fatalf("inspect lib after rebuild: %+v, %v; want available, valid, with the old invalidation remembered", info, err)
	}
}

func TestInvalidateRacesNewDependent(t *testing.T) {
	// A dependent published between the invalidation's read of the graph
	// and its Txn is invalidated too (the Txn fails and reads again); one
	// whose publish comes after the invalidation is refused. A safety
	// check: every round must end in one of these, whichever it is.
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "lib")
	outcomes := map[string]int{}
	for i := 0; i < 10; i++ {
		id := fmt.Sprintf("dep%d", i)
		done := make(chan error, 1)
		go func() {
			h := b.Handle(id)
			done <- h.BuildNeeds(ctx, []string{"lib"}, func(context.Context) error {
				return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), nil, 0o644)
			})
		}()
		if _, err := a.Invalidate(ctx, "lib", "race", "t"); err != nil {
			t.Fatal(err)
		}
		berr := <-done
		info, err := a.Inspect(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case berr == nil && info.Invalid != nil:
			outcomes["published, then invalidated with lib"]++
		case berr == nil && info.State != etcdstore.StateAvailable && info.Invalidated != nil:
			// Nothing held it: the invalidation removed it at once.
			outcomes["published, then invalidated with lib and removed"]++
		case errors.Is(berr, core.ErrInvalidated) && info.State != etcdstore.StateAvailable:
			outcomes["refused: lib was invalid"]++
		case errors.Is(berr, core.ErrPackageNotExist) && info.State != etcdstore.StateAvailable:
			outcomes["refused: lib was invalidated and removed already"]++
		default:
			t.Fatalf("round %d: build = %v, inspect = %+v: a dependent of an invalid package is valid", i, berr, info)
		}
		if _, err := a.SweepInvalid(ctx); err != nil {
			t.Fatal(err)
		}
		buildOn(t, a, "lib")
	}
	t.Logf("outcomes: %v", outcomes)
}

func TestInvalidateReadsAgainForANewDependent(t *testing.T) {
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "lib")
	once := true
	etcdstore.SetTestHookInvalidate(a, func(string) {
		if once { // a dependent published after the graph was read
			once = false
			buildOn(t, b, "late", "lib")
		}
	})
	rep, err := a.Invalidate(ctx, "lib", "bad", "t")
	if err != nil || !slices.Equal(rep.Invalidated, []string{"late", "lib"}) {
		t.Fatalf("invalidate = %+v, %v; want late (published meanwhile) and lib", rep, err)
	}
	if err := b.Handle("late").IncRef(); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("incref late = %v; want refused", err)
	}
}

func TestWhy(t *testing.T) {
	ctx := context.Background()
	a, b := twoHosts(t)
	buildOn(t, a, "lib")
	buildOn(t, a, "app", "lib")
	if err := b.Handle("app").IncRef(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Pin(ctx, "lib", etcdstore.PinOptions{Note: "keep", By: "bob"}); err != nil {
		t.Fatal(err)
	}
	w, err := a.Why(ctx, "lib", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !w.Alive || w.Pin == nil || w.Pin.By != "bob" || len(w.NeededBy) != 1 || w.NeededBy[0].ID != "app" ||
		len(w.NeededBy[0].Refs) != 1 || w.NeededBy[0].Refs[0].Host != "host-b" || w.GraceUntil.IsZero() {
		t.Fatalf("why lib = %+v; want alive: pinned by bob, needed by app held on host-b, in grace", w)
	}
	if err := b.Handle("app").DecRef(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Unpin(ctx, "lib"); err != nil {
		t.Fatal(err)
	}
	w, err = a.Why(ctx, "app", 0)
	if err != nil || w.Alive {
		t.Fatalf("why app with nothing on it = %+v, %v; want not alive", w, err)
	}
}

func TestRefusedRemovalOfInvalidLeavesNoLease(t *testing.T) {
	// The removal of an invalid package grants the lease of its
	// remembered invalidation before its Txn; a removal refused (the
	// package is still held) must give that lease back, or every sweep of
	// a held invalid package leaves one for the whole retention.
	ctx := context.Background()
	srv := etcdtest.Start(t)
	root := t.TempDir()
	a := newStore(t, srv, root, etcdstore.WithHost("host-a"))
	b := newStore(t, srv, root, etcdstore.WithHost("host-b"))
	cli := srv.Client(t)
	buildOn(t, a, "lib")
	if err := b.Handle("lib").IncRef(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Invalidate(ctx, "lib", "bad", "t"); err != nil {
		t.Fatal(err)
	}
	before, err := cli.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if removed, err := a.SweepInvalid(ctx); err != nil || len(removed) != 0 {
			t.Fatalf("sweep while held = %v, %v; want nothing removed", removed, err)
		}
	}
	after, err := cli.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Leases) != len(before.Leases) {
		t.Fatalf("leases: %d before 5 refused sweeps, %d after; want no new one", len(before.Leases), len(after.Leases))
	}
	if err := b.Handle("lib").DecRef(); err != nil { // the last holder leaves: removed now
		t.Fatal(err)
	}
	if info, err := a.Inspect(ctx, "lib"); err != nil || info.State != etcdstore.StateAbsent || info.Invalidated == nil {
		t.Fatalf("lib after its last holder left: %+v, %v; want removed, its invalidation remembered", info, err)
	}
}
