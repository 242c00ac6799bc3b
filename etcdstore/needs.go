package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// A package's needs are the packages it is built on. They are what makes a
// reference on a package protect its whole closure with no more etcd work
// than a reference on an island:
//
//   - The publish Txn of a package P that needs N checks that N is
//     published and not invalidated, and puts the edge need/<N>/<P>.
//   - The removal Txn of N checks that no edge need/<N>/… exists, so N
//     cannot go while any package that needs it exists; the removal Txn of
//     P deletes P's own edges.
//   - A reference on P keeps P, so its edges stay, so N stays, and so on
//     down the closure: one key, one Txn, whatever the closure's size.
//
// A build holds a reference on each need while it runs (before it queues
// for its own lock, so two builds that need each other cannot deadlock:
// the second finds the first not available and fails), which keeps the
// needs from a removal between its start and its publish. The graph is
// acyclic by construction: a need is published before its dependents.

type needsCtxKey struct{}

// BuildNeeds implements core.NeedsHandler.
func (h *Handle) BuildNeeds(ctx context.Context, needs []string, builder func(ctx context.Context) error) error {
	_, err := h.BuildNeedsOutcome(ctx, needs, builder)
	return err
}

// BuildNeedsOutcome is BuildNeeds with the outcome of BuildOutcome.
func (h *Handle) BuildNeedsOutcome(ctx context.Context, needs []string, builder func(ctx context.Context) error) (Outcome, error) {
	if h.err != nil {
		return Outcome{}, h.fail("build", h.err)
	}
	needs, err := checkNeeds(h.id, needs)
	if err != nil {
		return Outcome{}, h.fail("build", err)
	}
	if len(needs) == 0 {
		return h.BuildOutcome(ctx, builder)
	}
	// An available package needs nothing more (one read, as Build's fast
	// path does). Not BuildOutcome: if the package were removed after this
	// read, its attempt would publish without its needs.
	start := time.Now()
	var st state
	var release func()
	for tries := 1; ; tries++ {
		if st, err = h.s.readState(ctx, h.id); err == nil && (st.avail == nil || st.invalid != nil) {
			release, err = h.s.holdNeeds(ctx, needs)
		}
		// A call cut by a member that froze or went away is made again on
		// another, as the attempt's own steps are (build.go); nothing was
		// taken yet.
		if err == nil || !transient(err) || tries >= 4 || !sleepCtx(ctx, time.Duration(tries)*100*time.Millisecond) {
			break
		}
	}
	if err != nil {
		return Outcome{}, h.fail("build", err)
	}
	if release == nil { // available
		if err := h.s.awaitVisibleWhilePublished(ctx, h.id, st.avail); err != nil {
			return Outcome{}, h.fail("build", err)
		}
		return Outcome{How: AlreadyAvailable, Package: st.avail, LogDir: h.s.logDir(h.id), Elapsed: time.Since(start)}, nil
	}
	defer release()
	dirs := make([]core.Need, len(needs))
	for i, n := range needs {
		dirs[i] = core.Need{ID: n, Dir: h.s.outputDir(n)}
	}
	return h.BuildOutcome(context.WithValue(ctx, needsCtxKey{}, dirs), builder)
}

// checkNeeds validates needs and returns them without repeats, in their
// first order.
func checkNeeds(id string, needs []string) ([]string, error) {
	var out []string
	for _, n := range needs {
		if err := core.ValidateID(n); err != nil {
			return nil, fmt.Errorf("need: %w", err)
		}
		if n == id {
			return nil, fmt.Errorf("%w: %q cannot need itself", core.ErrInvalidID, id)
		}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(out) > core.MaxNeeds {
		return nil, fmt.Errorf("%d needs, more than %d (core.MaxNeeds)", len(out), core.MaxNeeds)
	}
	return out, nil
}

// holdNeeds takes a reference on each need, waiting for one being built;
// release gives them back.
func (s *Store) holdNeeds(ctx context.Context, needs []string) (release func(), err error) {
	var held []*Handle
	release = func() {
		for _, h := range held {
			if err := h.DecRefContext(context.WithoutCancel(ctx)); err != nil {
				s.opt.logger.Warn("could not release a need after the build; its reference goes with the lease", "need", h.id, "err", err)
			}
		}
	}
	for _, n := range needs {
		h := s.Handle(n)
		if err := h.incRef(ctx, false); err != nil {
			release()
			if errors.Is(err, core.ErrPackageNotExist) {
				return nil, &NeedError{Need: n, Err: errors.Unwrap(err)}
			}
			return nil, err
		}
		held = append(held, h)
	}
	return release, nil
}

// flightNeeds copies the needs a caller's ctx carries into a flight's.
func flightNeeds(from, to context.Context) context.Context {
	if n, ok := from.Value(needsCtxKey{}).([]core.Need); ok {
		return context.WithValue(to, needsCtxKey{}, n)
	}
	return to
}

// attemptNeeds returns the needs an attempt's ctx carries.
func attemptNeeds(ctx context.Context) []core.Need {
	n, _ := ctx.Value(needsCtxKey{}).([]core.Need)
	return n
}

// needCmps and needOps are what a publish of id adds for its needs: each
// must be published and not invalidated, and each gets its edge.
func (s *Store) needCmps(needs []string) []clientv3.Cmp {
	var cmps []clientv3.Cmp
	for _, n := range needs {
		cmps = append(cmps,
			clientv3.Compare(clientv3.CreateRevision(s.keys.AvailKey(n)), ">", 0),
			clientv3.Compare(clientv3.CreateRevision(s.keys.InvalidKey(n)), "=", 0))
	}
	return cmps
}

func (s *Store) needOps(id string, needs []string) []clientv3.Op {
	var ops []clientv3.Op
	for _, n := range needs {
		ops = append(ops, clientv3.OpPut(s.keys.NeedKey(n, id), ""))
	}
	return ops
}

// needGone explains a refused publish whose needs changed: the first need
// that is no longer available, or nil.
func (s *Store) needGone(ctx context.Context, needs []string) error {
	for _, n := range needs {
		st, err := s.readState(ctx, n)
		if err != nil {
			return nil
		}
		switch {
		case st.invalid != nil:
			return &NeedError{Need: n, Err: st.invalid.err(n)}
		case st.avail == nil:
			return &NeedError{Need: n, Err: core.ErrPackageNotExist}
		}
	}
	return nil
}

// NeededBy lists the published packages that need id.
func (s *Store) NeededBy(ctx context.Context, id string) ([]string, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.keys.NeededBy(id), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, fmt.Errorf("needed-by %q: %w", id, err)
	}
	out := make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, s.keys.Parse(string(kv.Key)).Rest)
	}
	return out, nil
}

func needIDs(needs []core.Need) []string {
	var ids []string
	for _, n := range needs {
		ids = append(ids, n.ID)
	}
	return ids
}
