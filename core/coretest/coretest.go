// Package coretest is a conformance suite for core.PackageManager
// implementations, in the spirit of testing/fstest. An implementation's
// test calls TestPackageManager with a function that makes n managers
// sharing one backend, as n hosts would.
package coretest

import (
	"context"
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
	t.Run("WaitersOfFailedAttempt", func(t *testing.T) { testWaitersOfFailedAttempt(t, newManagers(t, 2)) })
	t.Run("TryRemoveDuringBuild", func(t *testing.T) { testTryRemoveDuringBuild(t, newManagers(t, 2)) })
	t.Run("LoggingDirectory", func(t *testing.T) { testLoggingDirectory(t, newManagers(t, 2)) })
	t.Run("ContextHandler", func(t *testing.T) { testContextHandler(t, newManagers(t, 2)) })
	t.Run("Graph", func(t *testing.T) { testGraph(t, newManagers(t, 2)) })
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

// testWaitersOfFailedAttempt: callers that wait on an attempt that fails,
// on its manager and on another, get an error wrapping ErrBuildFailed and
// do not run their own builders; a later caller tries again. Whether a
// caller joined the attempt before it failed cannot be observed through
// the interface, so a caller that arrived after the failure may build
// instead (it must then succeed); the round is repeated, with the failing
// builder holding on longer each time, until the waiters did wait.
func testWaitersOfFailedAttempt(t *testing.T, pms []core.PackageManager) {
	hold := 50 * time.Millisecond
	for round := 0; round < 6; round++ {
		if waited := failedAttemptRound(t, pms, fmt.Sprintf("fails-for-waiters-%d", round), hold); waited > 0 {
			return
		}
		hold *= 2
	}
	t.Fatalf("in 6 rounds no caller waited on the failing attempt (each built itself after it failed)")
}

// failedAttemptRound runs one attempt that fails after hold while two
// callers per manager ask for id, checks each caller's outcome, and
// returns how many got ErrBuildFailed.
func failedAttemptRound(t *testing.T, pms []core.PackageManager, id string, hold time.Duration) (waited int) {
	t.Helper()
	boom := errors.New("boom")
	started, failed := make(chan struct{}), make(chan struct{})
	h := pms[0].Get(id)
	first := make(chan error, 1)
	go func() {
		first <- h.Build(func() error {
			close(started)
			time.Sleep(hold) // the other callers' time to join (see the caller)
			close(failed)
			return boom
		})
	}()
	<-started
	type outcome struct {
		err   error
		built bool
	}
	outs := make(chan outcome, 2*len(pms))
	for _, pm := range pms {
		for range 2 {
			go func() {
				var built bool
				err := pm.Get(id).Build(func() error {
					select {
					case <-failed:
					default:
						t.Errorf("a waiter's builder ran while the first attempt was running")
					}
					built = true
					return os.WriteFile(filepath.Join(pm.Get(id).OutputDirectory(), "f"), []byte("x"), 0o644)
				})
				outs <- outcome{err, built}
			}()
		}
	}
	if err := <-first; !errors.Is(err, boom) {
		t.Fatalf("the failing Build = %v, want it to wrap the builder's error", err)
	}
	for range 2 * len(pms) {
		o := <-outs
		switch {
		case o.err != nil && !errors.Is(o.err, core.ErrBuildFailed):
			t.Errorf("a waiter's Build = %v, want an error wrapping ErrBuildFailed", o.err)
		case o.err != nil && o.built:
			t.Errorf("a waiter ran its builder and got %v", o.err)
		case o.err != nil:
			waited++
		}
	}
	return waited
}

// testTryRemoveDuringBuild: a TryRemove while a build runs, on its manager
// or another, removes nothing: it reports false (ErrPackageNotExist is
// allowed: the package is not available yet), the builder's partial output
// stays, and the build publishes it.
func testTryRemoveDuringBuild(t *testing.T, pms []core.PackageManager) {
	const id = "remove-during-build"
	h := pms[0].Get(id)
	started, release := make(chan struct{}), make(chan struct{})
	built := make(chan error, 1)
	go func() {
		built <- h.Build(func() error {
			if err := os.WriteFile(filepath.Join(h.OutputDirectory(), "early"), []byte("x"), 0o644); err != nil {
				return err
			}
			close(started)
			<-release
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "late"), []byte("y"), 0o644)
		})
	}()
	<-started
	for i, pm := range pms {
		ok, err := pm.Get(id).TryRemove()
		if ok || (err != nil && !errors.Is(err, core.ErrPackageNotExist)) {
			t.Errorf("manager %d: TryRemove during the build = %v, %v; want false and nil or ErrPackageNotExist", i, ok, err)
		}
	}
	if _, err := os.Stat(filepath.Join(h.OutputDirectory(), "early")); err != nil {
		t.Errorf("the build's partial output after a TryRemove during the build: %v", err)
	}
	close(release)
	if err := <-built; err != nil {
		t.Fatalf("Build = %v", err)
	}
	for _, f := range []string{"early", "late"} {
		if _, err := os.Stat(filepath.Join(pms[1].Get(id).OutputDirectory(), f)); err != nil {
			t.Errorf("published tree lacks %s: %v", f, err)
		}
	}
	if err := pms[1].Get(id).IncRef(); err != nil {
		t.Fatalf("IncRef after the build = %v", err)
	}
	if err := pms[1].Get(id).DecRef(); err != nil {
		t.Fatal(err)
	}
}

// testLoggingDirectory: every valid package has a logging directory, the
// same from every manager and apart from its output; the builder can write
// into it, and a failed build's logs stay there until the next attempt.
func testLoggingDirectory(t *testing.T, pms []core.PackageManager) {
	const id = "logs"
	h := pms[0].Get(id)
	logs := h.LoggingDirectory()
	if logs == "" {
		t.Fatalf("LoggingDirectory of a valid ID is empty")
	}
	if other := pms[1].Get(id).LoggingDirectory(); other != logs {
		t.Errorf("LoggingDirectory differs between managers: %q vs %q", other, logs)
	}
	if out := h.OutputDirectory(); logs == out || strings.HasPrefix(logs, out+string(filepath.Separator)) {
		t.Errorf("LoggingDirectory %q is (inside) OutputDirectory %q: logs would be part of the package", logs, out)
	}
	boom := errors.New("boom")
	err := h.Build(func() error {
		if err := os.WriteFile(filepath.Join(h.LoggingDirectory(), "attempt-1.log"), []byte("it broke"), 0o644); err != nil {
			return fmt.Errorf("write into LoggingDirectory: %w", err)
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("failing Build = %v, want it to wrap the builder's error", err)
	}
	if b, err := os.ReadFile(filepath.Join(pms[1].Get(id).LoggingDirectory(), "attempt-1.log")); err != nil || string(b) != "it broke" {
		t.Errorf("the failed build's log = %q, %v; want it kept", b, err)
	}
	if err := h.Build(writeFile(h, "f", "ok", nil)); err != nil {
		t.Fatalf("Build after the failure = %v", err)
	}
	for _, id := range InvalidIDs[:3] {
		if d := pms[0].Get(id).LoggingDirectory(); d != "" {
			t.Errorf("LoggingDirectory(%q) = %q, want empty for an invalid id", id, d)
		}
	}
}

// testContextHandler runs the context variants of handlers that offer
// them (core.ContextHandler): the same lifecycle as without, a context
// that has ended takes no reference and removes nothing, and a builder's
// context ends when its only caller's context does.
func testContextHandler(t *testing.T, pms []core.PackageManager) {
	if _, ok := pms[0].Get("x").(core.ContextHandler); !ok {
		t.Skipf("%T does not implement core.ContextHandler", pms[0].Get("x"))
	}
	handles := func(id string) (core.ContextHandler, core.ContextHandler) {
		return pms[0].Get(id).(core.ContextHandler), pms[1].Get(id).(core.ContextHandler)
	}
	t.Run("Lifecycle", func(t *testing.T) {
		h, other := handles("context-lifecycle")
		testContextLifecycle(t, h, other)
	})
	t.Run("EndedContext", func(t *testing.T) {
		h, other := handles("context-ended")
		testEndedContext(t, h, other)
	})
	t.Run("BuilderContextEnds", func(t *testing.T) {
		h, _ := handles("context-abandoned")
		testBuilderContextEnds(t, h)
	})
}

// testContextLifecycle is testLifecycle's core through the context
// variants, h building and other holding.
func testContextLifecycle(t *testing.T, h, other core.ContextHandler) {
	ctx := t.Context()
	if err := h.IncRefContext(ctx); !errors.Is(err, core.ErrPackageNotExist) {
		t.Fatalf("IncRefContext before the build = %v, want ErrPackageNotExist", err)
	}
	var builds atomic.Int32
	err := h.BuildContext(ctx, func(bctx context.Context) error {
		if bctx.Err() != nil {
			return fmt.Errorf("the builder's context ended already: %w", bctx.Err())
		}
		return writeFile(h, "f", "x", &builds)()
	})
	if err != nil || builds.Load() != 1 {
		t.Fatalf("BuildContext = %v (builder ran %d times), want nil and 1", err, builds.Load())
	}
	if err := other.IncRefContext(ctx); err != nil {
		t.Fatalf("IncRefContext = %v", err)
	}
	if ok, err := h.TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("TryRemoveContext while referenced = %v, %v; want false, nil", ok, err)
	}
	if err := other.DecRefContext(ctx); err != nil {
		t.Fatalf("DecRefContext = %v", err)
	}
	if err := other.DecRefContext(ctx); err == nil {
		t.Fatalf("DecRefContext without a reference = nil, want an error")
	}
	if ok, err := h.TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemoveContext without references = %v, %v; want true, nil", ok, err)
	}
}

// testEndedContext: a call whose context has ended before it starts fails
// and changes nothing: IncRefContext leaves no reference (a removal right
// after succeeds), TryRemoveContext removes nothing.
func testEndedContext(t *testing.T, h, other core.ContextHandler) {
	ctx := t.Context()
	if err := h.BuildContext(ctx, func(context.Context) error { return writeFile(h, "f", "x", nil)() }); err != nil {
		t.Fatalf("BuildContext = %v", err)
	}
	ended, cancel := context.WithCancel(ctx)
	cancel()
	if ok, err := h.TryRemoveContext(ended); ok || err == nil {
		t.Errorf("TryRemoveContext with an ended context = %v, %v; want false and an error", ok, err)
	}
	if err := other.IncRefContext(ctx); err != nil {
		t.Fatalf("IncRefContext after a TryRemoveContext with an ended context = %v, want nil (the package must still be there)", err)
	}
	if err := other.DecRefContext(ctx); err != nil {
		t.Fatalf("DecRefContext = %v", err)
	}
	if err := other.IncRefContext(ended); err == nil {
		t.Errorf("IncRefContext with an ended context = nil, want an error")
		other.DecRefContext(ctx) //nolint:errcheck // the reference it should not have taken
	}
	if ok, err := h.TryRemoveContext(ctx); !ok || err != nil {
		t.Fatalf("TryRemoveContext after an IncRefContext with an ended context = %v, %v; want true, nil (no reference may be left)", ok, err)
	}
}

// testBuilderContextEnds: when the only caller of an attempt gives up, the
// builder's context ends, BuildContext returns an error, and nothing is
// published.
func testBuilderContextEnds(t *testing.T, h core.ContextHandler) {
	ctx, cancel := context.WithCancel(t.Context())
	started := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- h.BuildContext(ctx, func(bctx context.Context) error {
			close(started)
			<-bctx.Done()
			return bctx.Err()
		})
	}()
	<-started
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatalf("BuildContext whose caller gave up = nil, want an error")
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the builder's context did not end within 30 s of its only caller's")
	}
	// IncRef waits for a build in progress: an attempt the builder did not
	// leave would hold it, so it is bounded.
	ictx, icancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer icancel()
	if err := h.IncRefContext(ictx); !errors.Is(err, core.ErrPackageNotExist) {
		t.Errorf("IncRefContext after an abandoned build = %v, want ErrPackageNotExist (a deadline: the abandoned attempt still runs)", err)
	}
}
