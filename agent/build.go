package agent

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"

	"github.com/granary-build/granary/core"
)

// clientBuild is a build request: its builder, run when the node says so.
type clientBuild struct {
	builder func(context.Context) error
	needs   []core.Need        // given to the builder (core.NeedsOf)
	cancel  context.CancelFunc // of the running builder
	ran     bool
	err     error         // the builder's
	done    chan struct{} // closed when the builder has returned
}

// BuildContext makes the package available with the node's store: callers
// on this host share one attempt, whose builder runs in the process of one
// of them (this one, if the node says so, with a context that ends when
// the node stops the attempt). If the process running the builder goes
// away, the node abandons the attempt and the other callers try again with
// their own builders. A failure of this process's builder is wrapped in
// the returned error. If ctx has ended already nothing is sent; if it ends
// later the node is told, and when no other caller on the host waits for
// the attempt, the node stops it (the builder's context ends).
func (h *Handle) BuildContext(ctx context.Context, builder func(ctx context.Context) error) error {
	_, err := h.BuildOutcome(ctx, builder)
	return err
}

// BuildOutcome is BuildContext that also says how the package came to be
// available, from the node's side: Built means this host's attempt built
// it (with this process's builder if it ran, else another local caller's),
// Waited that another host did.
func (h *Handle) BuildOutcome(ctx context.Context, builder func(ctx context.Context) error) (Outcome, error) {
	return h.BuildNeedsOutcome(ctx, nil, builder)
}

// BuildNeeds implements core.NeedsHandler: BuildContext for a package
// built on the packages needs (at most core.MaxNeeds). The node takes a
// reference on each need before the attempt (waiting for one being built;
// an error wrapping core.ErrPackageNotExist names a need that is not
// available, and core.ErrInvalidated one that was invalidated) and holds
// them while the builder runs; the builder finds them with core.NeedsOf
// (their OutputDirectory, stable paths it may embed). The published
// package records its needs, and a reference on it protects them.
func (h *Handle) BuildNeeds(ctx context.Context, needs []string, builder func(ctx context.Context) error) error {
	_, err := h.BuildNeedsOutcome(ctx, needs, builder)
	return err
}

// BuildNeedsOutcome is BuildNeeds with the outcome of BuildOutcome.
func (h *Handle) BuildNeedsOutcome(ctx context.Context, needs []string, builder func(ctx context.Context) error) (Outcome, error) {
	if h.err != nil {
		return Outcome{}, h.fail(OpBuild, h.err)
	}
	c := h.c
	b := &clientBuild{builder: builder, done: make(chan struct{})}
	for _, n := range needs {
		if err := core.ValidateID(n); err != nil {
			return Outcome{}, h.fail(OpBuild, fmt.Errorf("need: %w", err))
		}
		b.needs = append(b.needs, core.Need{ID: n, Dir: c.Handle(n).OutputDirectory()})
	}
	if err := ctx.Err(); err != nil {
		return Outcome{}, h.fail(OpBuild, err) // nothing sent: no attempt starts for a caller that gave up
	}
	s := c.sendBuild(h.id, needs, b)
	if s.err != nil {
		return Outcome{}, h.fail(OpBuild, s.err)
	}
	defer c.forgetBuild(s.seq, b)
	r, err := c.await(ctx, s, false)
	switch {
	case err == nil:
		if r.Outcome == nil {
			return Outcome{}, nil
		}
		return *r.Outcome, nil
	case ctx.Err() != nil && r.Op == "":
		c.write(&Msg{Op: OpCancel, Seq: s.seq}, true) //nolint:errcheck // a dead connection abandons the attempt anyway
		return Outcome{}, h.fail(OpBuild, ctx.Err())
	}
	var re *Error
	if errors.As(err, &re) {
		re.own = b.result(c)
	}
	return Outcome{}, h.fail(OpBuild, err)
}

// sendBuild registers b and sends its request.
func (c *Conn) sendBuild(id string, needs []string, b *clientBuild) sent {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return sent{err: err}
	}
	c.seq++
	s := sent{cl: &call{op: OpBuild, id: id, reply: make(chan Msg, 1)}, seq: c.seq}
	c.pending[s.seq] = s.cl
	c.builds[s.seq] = b
	c.mu.Unlock()
	if err := c.write(&Msg{Op: OpBuild, Seq: s.seq, ID: id, Needs: needs}, true); err != nil {
		return sent{err: err}
	}
	return s
}

// forgetBuild forgets build request seq, whose caller has returned. A
// builder that has not started never will: a later OpBuildNow finds no
// build and is answered that the attempt is abandoned (the node's other
// callers then try with their own builders). A builder that runs is
// forgotten once it has returned: the node may still wait for its result
// on behalf of other callers, and stops it (OpBuildStop) when none is left.
func (c *Conn) forgetBuild(seq uint64, b *clientBuild) {
	c.mu.Lock()
	if !b.ran {
		delete(c.builds, seq)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	go func() {
		b.result(c)
		c.mu.Lock()
		delete(c.builds, seq)
		c.mu.Unlock()
	}()
}

// result waits for b's builder, if it ran, and returns its error (nil if
// it did not run or the connection ended first).
func (b *clientBuild) result(c *Conn) error {
	c.mu.Lock()
	ran := b.ran
	c.mu.Unlock()
	if !ran {
		return nil
	}
	select {
	case <-b.done:
		return b.err
	case <-c.done:
		return nil
	}
}

// runBuilder runs the builder of build request seq, from its own
// goroutine, and sends the result.
func (c *Conn) runBuilder(seq uint64) {
	c.mu.Lock()
	b := c.builds[seq]
	if b == nil || b.ran || c.err != nil {
		c.mu.Unlock()
		if b == nil {
			c.write(&Msg{Op: OpBuilt, Seq: seq, Err: "no such build", Codes: []string{CodeAbandon}}, true) //nolint:errcheck
		}
		return
	}
	b.ran = true
	bctx, cancel := context.WithCancel(context.WithValue(context.Background(), builderKey{}, builderRef{c, seq}))
	if len(b.needs) > 0 {
		bctx = core.WithNeeds(bctx, b.needs)
	}
	b.cancel = cancel
	c.mu.Unlock()
	go func() {
		defer cancel()
		err := callBuilder(bctx, b.builder)
		c.mu.Lock()
		b.err = err
		c.mu.Unlock()
		close(b.done)
		m := Msg{Op: OpBuilt, Seq: seq}
		if err != nil {
			m.Err, m.Codes = err.Error(), Codes(err)
			if m.Err == "" {
				m.Err = "builder failed"
			}
		}
		c.write(&m, true) //nolint:errcheck // a dead connection abandons the attempt anyway
	}()
}

// stopBuilder cancels the context of build request seq's builder.
func (c *Conn) stopBuilder(seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b := c.builds[seq]; b != nil && b.cancel != nil {
		b.cancel()
	}
}

type builderKey struct{}

// builderRef names the build request whose builder a context belongs to.
type builderRef struct {
	c   *Conn
	seq uint64
}

// BuilderProcessGroup tells the node that the builder whose context is
// ctx (the one a Handle.BuildContext builder receives) runs processes in
// process group pgid. If this process dies mid-build, the node kills that
// group when it abandons the attempt, so that no builder outlives its
// attempt. It reports false if ctx is not such a builder's context.
func BuilderProcessGroup(ctx context.Context, pgid int) bool {
	r, ok := ctx.Value(builderKey{}).(builderRef)
	if !ok {
		return false
	}
	return r.c.write(&Msg{Op: OpBuilderPG, Seq: r.seq, PID: pgid}, true) == nil
}

// callBuilder calls builder, turning a panic into an error.
func callBuilder(ctx context.Context, builder func(context.Context) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("builder panicked: %v\n%s", r, debug.Stack())
		}
	}()
	return builder(ctx)
}
