package node_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/etcdtest"
)

// A build through the node carries its needs: the builder finds them with
// core.NeedsOf, the record lists them, the need cannot be removed while
// its dependent exists; pin, why and invalidate work through the socket.
func TestGraphThroughNode(t *testing.T) {
	ctx := context.Background()
	srv := etcdtest.Start(t)
	nd, _ := agentNode(t, srv, t.TempDir(), "host-a", 0)
	c := connect(t, nd)
	write := func(ctx context.Context, dir, data string) error {
		return os.WriteFile(filepath.Join(dir, "f"), []byte(data), 0o644)
	}
	a := c.Handle("a")
	if err := a.Build(func() error { return write(ctx, a.OutputDirectory(), "a") }); err != nil {
		t.Fatalf("build a: %v", err)
	}
	b := c.Handle("b")
	var got []core.Need
	err := b.BuildNeeds(ctx, []string{"a"}, func(bctx context.Context) error {
		got = core.NeedsOf(bctx)
		return write(bctx, b.OutputDirectory(), "b")
	})
	if err != nil {
		t.Fatalf("build b needing a: %v", err)
	}
	if want := []core.Need{{ID: "a", Dir: a.OutputDirectory()}}; !slices.Equal(got, want) {
		t.Errorf("the builder's needs = %v, want %v", got, want)
	}
	err = c.Handle("c").BuildNeeds(ctx, []string{"nope"}, func(context.Context) error { return nil })
	if !errors.Is(err, core.ErrPackageNotExist) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("build needing a missing package = %v, want ErrPackageNotExist naming it", err)
	}
	info, _, err := c.Inspect(ctx, "a")
	if err != nil || !slices.Equal(info.NeededBy, []string{"b"}) {
		t.Fatalf("inspect a: needed by %v (%v), want [b]", info.NeededBy, err)
	}
	if ok, err := a.TryRemoveContext(ctx); ok || err != nil {
		t.Fatalf("rm a while b needs it = %v, %v; want refused", ok, err)
	}

	pin, err := c.Pin(ctx, "b", agent.PinOptions{For: time.Hour, Note: "release"})
	if err != nil || pin.Note != "release" || pin.Until.IsZero() {
		t.Fatalf("pin b = %+v, %v", pin, err)
	}
	w, err := c.Why(ctx, "a")
	if err != nil || !w.Alive || len(w.NeededBy) != 1 || w.NeededBy[0].Pin == nil {
		t.Fatalf("why a = %+v, %v; want kept by b, which is pinned", w, err)
	}
	if ok, err := c.Unpin(ctx, "b"); !ok || err != nil {
		t.Fatalf("unpin b = %v, %v", ok, err)
	}

	if err := b.IncRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	rep, err := c.Invalidate(ctx, "a", "miscompiled")
	if err != nil || !slices.Equal(rep.Invalidated, []string{"b", "a"}) || !slices.Contains(rep.Held, "b") {
		t.Fatalf("invalidate a = %+v, %v; want b and a invalidated, b held", rep, err)
	}
	c2 := connect(t, nd)
	for _, id := range []string{"a", "b"} {
		err := c2.Handle(id).IncRefContext(ctx)
		if !errors.Is(err, core.ErrInvalidated) || !errors.Is(err, core.ErrPackageNotExist) || !strings.Contains(err.Error(), "miscompiled") {
			t.Errorf("incref %s after the invalidation = %v, want ErrInvalidated with the reason", id, err)
		}
	}
	if err := b.DecRefContext(ctx); err != nil {
		t.Fatal(err)
	}
	// The node's sweeper removes both once the last holder has left.
	deadline := time.Now().Add(30 * time.Second)
	for {
		ia, _, err := c.Inspect(ctx, "a")
		ib, _, err2 := c.Inspect(ctx, "b")
		if err == nil && err2 == nil && ia.State == agent.StateAbsent && ib.State == agent.StateAbsent {
			if ia.Invalidated == nil || ia.Invalidated.Reason != "miscompiled" {
				t.Errorf("a's removed invalidation = %+v, want its record", ia.Invalidated)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a and b not removed 30s after their last holder left: %s, %s", ia.State, ib.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
