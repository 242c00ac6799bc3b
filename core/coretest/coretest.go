// Package coretest is a conformance suite for core.PackageManager
// implementations, in the spirit of testing/fstest. An implementation's
// test calls TestPackageManager with a function that makes n managers
// sharing one backend, as n hosts would.
package coretest

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/granary-build/granary/core"
)

// NewManagers returns n managers that share one backend (one root, one
// coordination service), each as a separate participant. The suite calls it
// once per subtest; the implementation cleans up with t.Cleanup.
type NewManagers func(t *testing.T, n int) []core.PackageManager

// TestPackageManager runs the conformance suite.
func TestPackageManager(t *testing.T, newManagers NewManagers) {
	t.Run("Lifecycle", func(t *testing.T) { testLifecycle(t, newManagers(t, 1)[0]) })
	t.Run("BuildOnceAcrossManagers", func(t *testing.T) { testBuildOnce(t, newManagers(t, 3)) })
	t.Run("RefsAcrossManagers", func(t *testing.T) { testRefsAcross(t, newManagers(t, 2)) })
	t.Run("BuilderError", func(t *testing.T) { testBuilderError(t, newManagers(t, 2)) })
	t.Run("BuilderPanic", func(t *testing.T) { testBuilderPanic(t, newManagers(t, 1)[0]) })
	t.Run("InvalidIDs", func(t *testing.T) { testInvalidIDs(t, newManagers(t, 1)[0]) })
	t.Run("DecRefWithoutRef", func(t *testing.T) { testDecRefWithoutRef(t, newManagers(t, 1)[0]) })
	t.Run("IncRefWaitsForBuild", func(t *testing.T) { testIncRefWaitsForBuild(t, newManagers(t, 2)) })
}

// writeFile returns a builder that writes name=content into h's output.
func writeFile(h core.PackageHandler, name, content string, count *atomic.Int32) func() error {
	return func() error {
		if count != nil {
			count.Add(1)
		}
		return os.WriteFile(filepath.Join(h.OutputDirectory(), name), []byte(content), 0o644)
	}
}

func testLifecycle(t *testing.T, pm core.PackageManager) {
	h := pm.Get("lifecycle-1")
	if err := h.IncRef(); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRef before Build = %v, want ErrPackageNotExist", err)
	}
	if ok, err := h.TryRemove(); ok || !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("TryRemove before Build = %v, %v; want false, ErrPackageNotExist", ok, err)
	}
	var builds atomic.Int32
	if err := h.Build(writeFile(h, "hello", "hi", &builds)); err != nil {
		t.Fatalf("Build = %v", err)
	}
	if err := h.Build(writeFile(h, "hello", "again", &builds)); err != nil {
		t.Fatalf("second Build = %v", err)
	}
	if n := builds.Load(); n != 1 {
		t.Fatalf("builder ran %d times, want 1", n)
	}
	b, err := os.ReadFile(filepath.Join(h.OutputDirectory(), "hello"))
	if err != nil || string(b) != "hi" {
		t.Fatalf("output = %q, %v; want %q", b, err, "hi")
	}
	if err := h.IncRef(); err != nil {
		t.Fatalf("IncRef = %v", err)
	}
	if ok, err := h.TryRemove(); ok || err != nil {
		t.Fatalf("TryRemove with a ref = %v, %v; want false, nil", ok, err)
	}
	if err := h.DecRef(); err != nil {
		t.Fatalf("DecRef = %v", err)
	}
	if ok, err := h.TryRemove(); !ok || err != nil {
		t.Fatalf("TryRemove without refs = %v, %v; want true, nil", ok, err)
	}
	if _, err := os.Stat(h.OutputDirectory()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("output directory after TryRemove: stat = %v, want not exist", err)
	}
	if err := h.IncRef(); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRef after TryRemove = %v, want ErrPackageNotExist", err)
	}
	// Removed packages can be built again.
	if err := h.Build(writeFile(h, "hello", "rebuilt", &builds)); err != nil {
		t.Fatalf("Build after removal = %v", err)
	}
	if n := builds.Load(); n != 2 {
		t.Fatalf("builder ran %d times, want 2 after removal", n)
	}
}

func testBuildOnce(t *testing.T, pms []core.PackageManager) {
	const perManager = 12
	var builds atomic.Int32
	var wg sync.WaitGroup
	errs := make(chan error, len(pms)*perManager)
	dirs := make(chan string, len(pms)*perManager)
	for _, pm := range pms {
		for range perManager {
			wg.Go(func() {
				h := pm.Get("build-once")
				errs <- h.Build(writeFile(h, "f", "x", &builds))
				dirs <- h.OutputDirectory()
			})
		}
	}
	wg.Wait()
	close(errs)
	close(dirs)
	for err := range errs {
		if err != nil {
			t.Errorf("Build = %v", err)
		}
	}
	if n := builds.Load(); n != 1 {
		t.Errorf("builder ran %d times across %d managers × %d goroutines, want 1", n, len(pms), perManager)
	}
	first := <-dirs
	for d := range dirs {
		if d != first {
			t.Errorf("OutputDirectory differs between managers: %q vs %q", d, first)
		}
	}
}

func testRefsAcross(t *testing.T, pms []core.PackageManager) {
	a, b := pms[0].Get("refs-across"), pms[1].Get("refs-across")
	if err := a.Build(writeFile(a, "f", "x", nil)); err != nil {
		t.Fatal(err)
	}
	if err := a.IncRef(); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryRemove(); ok || err != nil {
		t.Fatalf("TryRemove on another manager while referenced = %v, %v; want false, nil", ok, err)
	}
	if err := a.DecRef(); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryRemove(); !ok || err != nil {
		t.Fatalf("TryRemove after DecRef = %v, %v; want true, nil", ok, err)
	}
}

func testBuilderError(t *testing.T, pms []core.PackageManager) {
	h := pms[0].Get("fails")
	boom := errors.New("boom")
	err := h.Build(func() error {
		os.WriteFile(filepath.Join(h.OutputDirectory(), "partial"), []byte("x"), 0o644)
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Build = %v, want it to wrap the builder's error", err)
	}
	if err := h.IncRef(); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRef after failed build = %v, want ErrPackageNotExist", err)
	}
	if _, err := os.Stat(filepath.Join(h.OutputDirectory(), "partial")); err == nil {
		t.Fatalf("partial output of a failed build is still in OutputDirectory")
	}
	// The lock is free and a later Build, from any manager, runs again.
	h2 := pms[1].Get("fails")
	var builds atomic.Int32
	if err := h2.Build(writeFile(h2, "f", "ok", &builds)); err != nil {
		t.Fatalf("Build after failure = %v", err)
	}
	if builds.Load() != 1 {
		t.Fatalf("builder after failure ran %d times, want 1", builds.Load())
	}
}

func testBuilderPanic(t *testing.T, pm core.PackageManager) {
	h := pm.Get("panics")
	err := h.Build(func() error { panic("kaboom") })
	if err == nil || !strings.Contains(err.Error(), "kaboom") {
		t.Fatalf("Build with panicking builder = %v, want an error naming the panic", err)
	}
	var builds atomic.Int32
	if err := h.Build(writeFile(h, "f", "ok", &builds)); err != nil || builds.Load() != 1 {
		t.Fatalf("Build after panic = %v (builds %d), want nil and 1 build", err, builds.Load())
	}
}

// InvalidIDs are IDs every implementation must refuse.
var InvalidIDs = []string{"", ".", "..", "../escape", "a/b", `a\b`, "a\x00b", "a\nb", ".hidden", strings.Repeat("x", core.MaxIDLen+1)}

func testInvalidIDs(t *testing.T, pm core.PackageManager) {
	for _, id := range InvalidIDs {
		t.Run(fmt.Sprintf("%q", id), func(t *testing.T) {
			h := pm.Get(id)
			ran := false
			if err := h.Build(func() error { ran = true; return nil }); !errors.Is(err, core.ErrInvalidID) {
				t.Errorf("Build = %v, want ErrInvalidID", err)
			}
			if ran {
				t.Errorf("builder ran for invalid id")
			}
			if err := h.IncRef(); !errors.Is(err, core.ErrInvalidID) {
				t.Errorf("IncRef = %v, want ErrInvalidID", err)
			}
			if err := h.DecRef(); !errors.Is(err, core.ErrInvalidID) {
				t.Errorf("DecRef = %v, want ErrInvalidID", err)
			}
			if ok, err := h.TryRemove(); ok || !errors.Is(err, core.ErrInvalidID) {
				t.Errorf("TryRemove = %v, %v; want false, ErrInvalidID", ok, err)
			}
			if d := h.OutputDirectory(); d != "" {
				t.Errorf("OutputDirectory = %q, want empty for an invalid id", d)
			}
		})
	}
}

func testDecRefWithoutRef(t *testing.T, pm core.PackageManager) {
	h := pm.Get("no-ref")
	if err := h.DecRef(); err == nil {
		t.Fatalf("DecRef without IncRef = nil, want an error")
	}
	if err := h.Build(writeFile(h, "f", "x", nil)); err != nil {
		t.Fatal(err)
	}
	if err := h.IncRef(); err != nil {
		t.Fatal(err)
	}
	if err := h.DecRef(); err != nil {
		t.Fatal(err)
	}
	if err := h.DecRef(); err == nil {
		t.Fatalf("second DecRef after one IncRef = nil, want an error")
	}
}

// testIncRefWaitsForBuild is cipkg's "lock" behaviour: IncRef on a package
// that is being built waits for the build (it does not report the package
// missing) and then takes the reference, on the building manager and on
// another one. Code such as cipkg's executor uses IncRef as its probe
// before it expands a package's build dependencies.
func testIncRefWaitsForBuild(t *testing.T, pms []core.PackageManager) {
	const id = "incref-waits"
	h := pms[0].Get(id)
	started, release := make(chan struct{}), make(chan struct{})
	built := make(chan error, 1)
	go func() {
		built <- h.Build(func() error {
			close(started)
			<-release
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte("x"), 0o644)
		})
	}()
	<-started
	incs := make(chan error, len(pms))
	for _, pm := range pms {
		go func() { incs <- pm.Get(id).IncRef() }()
	}
	// Neither IncRef may answer while the builder runs. (This only catches
	// an IncRef that answers at once; one that waits passes either way.)
	select {
	case err := <-incs:
		close(release)
		t.Fatalf("IncRef during the build returned %v before the build ended, want it to wait", err)
	case <-time.After(300 * time.Millisecond):
	}
	close(release)
	if err := <-built; err != nil {
		t.Fatalf("Build = %v", err)
	}
	for range pms {
		if err := <-incs; err != nil {
			t.Errorf("IncRef that waited for the build = %v, want nil", err)
		}
	}
	for _, pm := range pms {
		if err := pm.Get(id).DecRef(); err != nil {
			t.Errorf("DecRef = %v", err)
		}
	}
}
