package coretest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/granary-build/granary/core"
)

// Curator is what the suite's pin and invalidation cases need of a
// manager beyond core's interfaces, which do not define pins and
// invalidation: an implementation's test adapts its own API to it.
type Curator interface {
	core.PackageManager
	// Pin keeps the package, and through its needs its closure, from
	// every removal until Unpin.
	Pin(ctx context.Context, id string) error
	Unpin(ctx context.Context, id string) error
	// Invalidate marks the package and its dependents bad: no new
	// reference; removed when the last holder leaves.
	Invalidate(ctx context.Context, id, reason string) error
}

// testGraph runs the closure cases: a held dependent protects its needs
// (and theirs), a needed package cannot be removed, a pin protects a
// closure, an invalidation refuses new references while holders keep
// theirs. pms[0] and pms[1] are two hosts.
func testGraph(t *testing.T, pms []core.PackageManager) {
	if _, ok := pms[0].Get("x").(core.NeedsHandler); !ok {
		t.Skip("the implementation's handlers do not implement core.NeedsHandler: no closure cases")
	}
	t.Run("HeldDependentProtectsClosure", func(t *testing.T) { testHeldDependent(t, pms) })
	t.Run("MissingNeed", func(t *testing.T) { testMissingNeed(t, pms[0]) })
	t.Run("Pin", func(t *testing.T) { testPin(t, pms) })
	t.Run("Invalidate", func(t *testing.T) { testInvalidate(t, pms) })
}

// buildNeeding builds id on pm with needs; its builder checks that it sees
// each need at its OutputDirectory and copies the need's file.
func buildNeeding(t *testing.T, pm core.PackageManager, id string, needs ...string) {
	t.Helper()
	h := pm.Get(id).(core.NeedsHandler)
	err := h.BuildNeeds(context.Background(), needs, func(ctx context.Context) error {
		got := core.NeedsOf(ctx)
		if len(got) != len(needs) {
			return errors.New("builder got the wrong needs")
		}
		for i, n := range got {
			if n.ID != needs[i] || n.Dir != pm.Get(n.ID).OutputDirectory() {
				return errors.New("builder got need " + n.ID + " at " + n.Dir)
			}
			if _, err := os.ReadFile(filepath.Join(n.Dir, "f")); err != nil {
				return err
			}
		}
		return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id), 0o644)
	})
	if err != nil {
		t.Fatalf("build %s needing %v: %v", id, needs, err)
	}
}

func mustRemove(t *testing.T, pm core.PackageManager, id string, want bool) {
	t.Helper()
	ok, err := pm.Get(id).TryRemove()
	if ok != want || err != nil {
		t.Fatalf("TryRemove(%s) = %v, %v; want %v, nil", id, ok, err, want)
	}
}

func testHeldDependent(t *testing.T, pms []core.PackageManager) {
	a, b := pms[0], pms[1]
	buildNeeding(t, a, "g-base")
	buildNeeding(t, a, "g-mid", "g-base")
	buildNeeding(t, a, "g-top", "g-mid")
	top := b.Get("g-top")
	if err := top.IncRef(); err != nil {
		t.Fatal(err)
	}
	mustRemove(t, a, "g-base", false) // held through g-mid and g-top
	mustRemove(t, a, "g-mid", false)
	for _, id := range []string{"g-top", "g-mid", "g-base"} {
		if _, err := os.Stat(filepath.Join(b.Get(id).OutputDirectory(), "f")); err != nil {
			t.Fatalf("holder of g-top cannot read %s: %v", id, err)
		}
	}
	if err := top.DecRef(); err != nil {
		t.Fatal(err)
	}
	mustRemove(t, a, "g-base", false) // still needed by g-mid, held or not
	mustRemove(t, a, "g-top", true)
	mustRemove(t, a, "g-mid", true)
	mustRemove(t, a, "g-base", true)
}

func testMissingNeed(t *testing.T, pm core.PackageManager) {
	ran := false
	err := pm.Get("g-lonely").(core.NeedsHandler).BuildNeeds(context.Background(), []string{"g-nope"}, func(context.Context) error {
		ran = true
		return nil
	})
	if !errors.Is(err, core.ErrPackageNotExist) || ran {
		t.Fatalf("BuildNeeds with a missing need = %v (builder ran: %v); want ErrPackageNotExist, builder not run", err, ran)
	}
}

func testPin(t *testing.T, pms []core.PackageManager) {
	a, b := pms[0], pms[1]
	cur, ok := a.(Curator)
	if !ok {
		t.Skip("the manager does not implement coretest.Curator: no pin case")
	}
	ctx := context.Background()
	buildNeeding(t, a, "p-base")
	buildNeeding(t, a, "p-top", "p-base")
	if err := cur.Pin(ctx, "p-top"); err != nil {
		t.Fatal(err)
	}
	mustRemove(t, b, "p-top", false)
	mustRemove(t, b, "p-base", false)
	if err := cur.Unpin(ctx, "p-top"); err != nil {
		t.Fatal(err)
	}
	mustRemove(t, b, "p-top", true)
	mustRemove(t, b, "p-base", true)
}

func testInvalidate(t *testing.T, pms []core.PackageManager) {
	a, b := pms[0], pms[1]
	cur, ok := a.(Curator)
	if !ok {
		t.Skip("the manager does not implement coretest.Curator: no invalidation case")
	}
	ctx := context.Background()
	buildNeeding(t, a, "i-lib")
	buildNeeding(t, a, "i-app", "i-lib")
	held := b.Get("i-app")
	if err := held.IncRef(); err != nil {
		t.Fatal(err)
	}
	if err := cur.Invalidate(ctx, "i-lib", "conformance"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"i-lib", "i-app"} {
		for _, pm := range pms[:2] {
			if err := pm.Get(id).IncRef(); !errors.Is(err, core.ErrInvalidated) || !errors.Is(err, core.ErrPackageNotExist) {
				t.Fatalf("IncRef(%s) after invalidating i-lib = %v; want ErrInvalidated and ErrPackageNotExist", id, err)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(held.OutputDirectory(), "f")); err != nil {
		t.Fatalf("the holder of i-app lost its tree: %v", err)
	}
	if err := held.DecRef(); err != nil {
		t.Fatal(err)
	}
	// The next build of each builds afresh: it waits for the removal that
	// the holder's leaving starts.
	var built []string
	for _, id := range []string{"i-lib", "i-app"} {
		h := a.Get(id).(core.NeedsHandler)
		var needs []string
		if id == "i-app" {
			needs = []string{"i-lib"}
		}
		if err := h.BuildNeeds(ctx, needs, func(context.Context) error {
			built = append(built, id)
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id), 0o644)
		}); err != nil {
			t.Fatalf("build %s after its invalidation: %v", id, err)
		}
	}
	if !slices.Equal(built, []string{"i-lib", "i-app"}) {
		t.Fatalf("rebuilt %v; want i-lib and i-app built afresh", built)
	}
	if err := b.Get("i-app").IncRef(); err != nil {
		t.Fatalf("IncRef of the rebuilt i-app: %v", err)
	}
	if err := b.Get("i-app").DecRef(); err != nil {
		t.Fatal(err)
	}
}
