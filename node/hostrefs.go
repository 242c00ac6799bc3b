package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
)

// refStore is what the host references need of the store: one etcd
// reference per package on the node's lease, that a removal elsewhere may
// ask for (yield), and the means to prove it is still in etcd. Its calls
// may block on etcd; Proven does no I/O.
type refStore interface {
	// Take takes the host's etcd reference to id (a cached one); it may
	// wait for a build in progress.
	Take(ctx context.Context, id string) error
	// Release drops the host's etcd reference to id.
	Release(ctx context.Context, id string) error
	// Proven reports whether the host's etcd reference to id is known to
	// be in etcd now (no I/O).
	Proven(id string) bool
	// Confirm makes sure it is, asking etcd; an error wrapping
	// core.ErrPackageNotExist means it is lost with the package.
	Confirm(ctx context.Context, id string) error
	// Remove removes id if no reference holds it.
	Remove(ctx context.Context, id string) (bool, error)
	// RecordHolders writes the local holder count into the reference.
	RecordHolders(ctx context.Context, id string, n int) error
	// Invalid reports whether id was invalidated since the host's etcd
	// reference to it was taken (no I/O): its last local holder then
	// releases it at once, without the linger.
	Invalid(id string) bool
}

// storeRefs is the refStore of an etcdstore.Store.
type storeRefs struct{ s *etcdstore.Store }

func (r storeRefs) Take(ctx context.Context, id string) error {
	return r.s.Handle(id).IncRefCachedContext(ctx)
}
func (r storeRefs) Release(ctx context.Context, id string) error {
	return r.s.Handle(id).DecRefContext(ctx)
}
func (r storeRefs) Proven(id string) bool { return r.s.RefProven(id) }
func (r storeRefs) Confirm(ctx context.Context, id string) error {
	return r.s.Handle(id).ConfirmRefContext(ctx)
}
func (r storeRefs) Remove(ctx context.Context, id string) (bool, error) {
	return r.s.Handle(id).TryRemoveContext(ctx)
}
func (r storeRefs) RecordHolders(ctx context.Context, id string, n int) error {
	return r.s.Handle(id).RecordHolders(ctx, n)
}
func (r storeRefs) Invalid(id string) bool { return r.s.RefInvalid(id) }

// hostRefs aggregates a host's local references (its jobs') into at most
// one etcd reference per package, held while any job holds the package and
// for the linger after the last one lets go.
//
// Invariants, for each package's hostRef p (all fields guarded by mu):
//
//  1. A local reference is granted (holders++) only while p.etcd is set
//     and the store proves the etcd reference (refStore.Proven, or a
//     Confirm that succeeded just now): never on the strength of p.etcd
//     alone, which is only this node's memory.
//  2. p.etcd changes only in the goroutine that owns p.busy (non-nil while
//     one goroutine takes, confirms, releases or removes); everyone else
//     waits for busy to close and looks again. So the store is asked for
//     at most one Take per package at a time, however many jobs ask.
//  3. While holders > 0 the etcd reference is not released by this node:
//     linger expiry and yield check holders under mu before they start a
//     release.
//  4. Once holders reaches 0 with p.etcd set, exactly one linger timer is
//     pending (or the linger is 0 and the release is under way), so the
//     etcd reference always goes unless a job takes the package again.
//     The timer is lazy: a grant leaves it armed, and a drop to 0 holders
//     only records when (idle) if it is; when it fires it retires if
//     holders > 0 (the next drop to 0 arms a new one), waits out the rest
//     if the package has not been idle for the whole linger, and releases
//     otherwise. So a warm pair (a grant, then its drop) arms, stops or
//     resets no timer.
//  5. A hostRef with no holders, no etcd reference, no timer and not busy
//     is deleted from pkgs.
//
// Lock order: mu before the store's own (leaf) locks, which Proven takes;
// nothing else is called, and nothing blocks, while mu is held.
type hostRefs struct {
	store     refStore
	linger    time.Duration
	opTimeout time.Duration
	log       *slog.Logger
	// lost tells the local holders of id that their package is gone (the
	// node pushes "ref lost" to their connections). Called without mu.
	lost func(id string, cause error)

	mu     sync.Mutex
	closed bool
	pkgs   map[string]*hostRef
	wg     sync.WaitGroup // releases, censuses and losses in the background
}

// hostRef is the host's aggregate of the local references to one package.
type hostRef struct {
	holders int  // local references, over every connection
	etcd    bool // the node holds the store's etcd reference (not proof it is in etcd)
	// busy is non-nil while one goroutine takes, confirms, releases or
	// removes the etcd reference; others wait for it to close and look
	// again.
	busy   chan struct{}
	taking bool        // the busy owner is a Take (it may wait for a build)
	timer  *time.Timer // linger: releases the etcd reference when it fires
	gen    uint64      // bumped whenever a pending linger release must not happen
	idle   time.Time   // when holders last reached 0 (the linger runs from there)
}

func newHostRefs(store refStore, linger, opTimeout time.Duration, log *slog.Logger, lost func(string, error)) *hostRefs {
	return &hostRefs{store: store, linger: linger, opTimeout: opTimeout, log: log, lost: lost,
		pkgs: make(map[string]*hostRef)}
}

// ref returns id's hostRef, made if needed. mu must be held.
func (h *hostRefs) ref(id string) *hostRef {
	p := h.pkgs[id]
	if p == nil {
		p = &hostRef{}
		h.pkgs[id] = p
	}
	return p
}

// settle ends p's busy period, and keeps invariants 4 and 5: an etcd
// reference that no job holds gets its linger (a linger timer that fired
// while p was busy did nothing), an empty hostRef goes. mu must be held.
func (h *hostRefs) settle(id string, p *hostRef) {
	close(p.busy)
	p.busy = nil
	switch {
	case p.holders == 0 && p.etcd && p.timer == nil && !h.closed:
		h.startLinger(id, p)
	case p.holders == 0 && !p.etcd && p.timer == nil && h.pkgs[id] == p:
		delete(h.pkgs, id)
	}
}

// startLinger arms p's linger timer, the linger running from now (with no
// linger, it fires at once and the release runs in the background). mu
// must be held.
func (h *hostRefs) startLinger(id string, p *hostRef) {
	p.gen++
	gen := p.gen
	p.idle = time.Now()
	p.timer = time.AfterFunc(h.linger, func() { h.expire(id, p, gen) })
}

// stopLinger disarms p's linger timer: the release it would make must not
// happen. mu must be held.
func (h *hostRefs) stopLinger(p *hostRef) {
	p.gen++
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
}

// acquire waits until nobody else changes id's hostRef, then makes the
// caller the one that does (busy set) and returns it with mu held. On
// error mu is not held.
func (h *hostRefs) acquire(ctx context.Context, id string) (*hostRef, error) {
	for {
		h.mu.Lock()
		p := h.ref(id)
		if p.busy == nil {
			p.busy = make(chan struct{})
			return p, nil
		}
		ch := p.busy
		h.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// hold adds a local holder to p. A pending linger timer stays armed: it
// retires when it finds holders (invariant 4). mu must be held.
func (h *hostRefs) hold(p *hostRef) {
	p.holders++
}

// tryFast grants a local reference to id without I/O if the host holds
// its etcd reference, the store proves it, and nobody is changing it.
func (h *hostRefs) tryFast(id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.pkgs[id]
	if p == nil || p.busy != nil || !p.etcd || !h.store.Proven(id) {
		return false
	}
	h.hold(p)
	return true
}

// take grants a local reference to id: from the host's etcd reference if
// the store proves it, after a Confirm if it does not, or after taking the
// etcd reference first (one Take for every local caller that comes
// meanwhile; it may wait for a build).
func (h *hostRefs) take(ctx context.Context, id string) error {
	if err := core.ValidateID(id); err != nil {
		return fmt.Errorf("incref %q: %w", id, err)
	}
	for {
		h.mu.Lock()
		if h.closed {
			h.mu.Unlock()
			return fmt.Errorf("incref %q: %w", id, ErrNodeGone)
		}
		p := h.ref(id)
		if p.busy != nil {
			ch := p.busy
			h.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return fmt.Errorf("incref %q: %w", id, ctx.Err())
			}
		}
		if p.etcd && h.store.Proven(id) {
			h.hold(p)
			h.mu.Unlock()
			return nil
		}
		p.busy = make(chan struct{})
		held := p.etcd
		p.taking = !held
		h.mu.Unlock()
		if held {
			return h.confirm(ctx, id, p)
		}
		// Cached: a removal elsewhere may ask for it back while no local
		// holder has the package (yield).
		err := h.store.Take(ctx, id)
		h.mu.Lock()
		p.taking = false
		if err == nil {
			p.etcd = true
			h.hold(p)
		}
		h.settle(id, p)
		h.mu.Unlock()
		return err
	}
}

// confirm is take for a package whose etcd reference the host holds but
// the store does not prove (its key was deleted, its lease is being
// renewed, or its watch is down): it asks the store, and grants if the
// reference is confirmed. A reference lost with its package is dropped.
// The caller owns p.busy.
func (h *hostRefs) confirm(ctx context.Context, id string, p *hostRef) error {
	err := h.store.Confirm(ctx, id)
	lost := errors.Is(err, core.ErrPackageNotExist) || errors.Is(err, etcdstore.ErrNoRef)
	if errors.Is(err, core.ErrInvalidated) {
		// Invalidated: no new holder, but those that hold it keep it
		// (invariant 3); the last one releases it at once (drop).
		h.mu.Lock()
		lost = p.holders == 0
		h.mu.Unlock()
	}
	if lost {
		// The store keeps a lost reference until it is released; that
		// release makes no etcd call.
		h.store.Release(context.WithoutCancel(ctx), id) //nolint:errcheck // a lost reference goes without etcd
	}
	h.mu.Lock()
	switch {
	case err == nil:
		h.hold(p)
	case lost:
		p.etcd = false
		h.stopLinger(p) // no linger release of a reference that is gone
	}
	h.settle(id, p)
	h.mu.Unlock()
	return err // the store's error names the operation and the package
}

// drop drops a local reference. The last one starts the linger, after
// which the host's etcd reference goes; with no linger it goes now.
func (h *hostRefs) drop(id string) error {
	h.mu.Lock()
	p := h.pkgs[id]
	if p == nil || p.holders == 0 {
		h.mu.Unlock()
		return fmt.Errorf("decref %q: %w", id, etcdstore.ErrNoRef)
	}
	p.holders--
	if p.holders > 0 || !p.etcd || h.closed {
		// Closed: the store's Close revokes the lease with the reference.
		if p.holders == 0 && !p.etcd && p.busy == nil && p.timer == nil {
			delete(h.pkgs, id)
		}
		h.mu.Unlock()
		return nil
	}
	if h.linger > 0 && !h.store.Invalid(id) {
		if p.timer == nil {
			h.startLinger(id, p)
		} else {
			p.idle = time.Now() // the armed timer waits out the linger from here
		}
		h.mu.Unlock()
		return nil
	}
	h.stopLinger(p)
	h.mu.Unlock()
	// No linger: release now, unless someone took it again meanwhile.
	p, err := h.acquire(context.Background(), id)
	if err != nil {
		return err
	}
	if p.holders > 0 || !p.etcd {
		h.settle(id, p)
		h.mu.Unlock()
		return nil
	}
	h.mu.Unlock()
	return h.release(id, p)
}

// expire is the linger timer of p: it releases the etcd reference unless a
// local holder has it, or had it less than the linger ago (then it fires
// again when the linger from the last drop has passed).
func (h *hostRefs) expire(id string, p *hostRef, gen uint64) {
	h.mu.Lock()
	if wait := h.linger - time.Since(p.idle); wait > 0 && !h.closed && h.pkgs[id] == p && p.gen == gen &&
		p.holders == 0 && p.etcd && p.busy == nil {
		p.timer.Reset(wait)
		h.mu.Unlock()
		return
	}
	if h.closed || h.pkgs[id] != p || p.gen != gen || p.holders > 0 || !p.etcd || p.busy != nil {
		if p.gen == gen {
			p.timer = nil
			if p.busy == nil && p.holders == 0 && !p.etcd && h.pkgs[id] == p {
				delete(h.pkgs, id)
			}
		}
		h.mu.Unlock()
		return
	}
	p.timer = nil
	p.busy = make(chan struct{})
	h.wg.Add(1)
	h.mu.Unlock()
	defer h.wg.Done()
	if err := h.release(id, p); err != nil {
		h.log.Warn("agent: release of the host's reference failed (the store retries in the background)", "id", id, "err", err)
	}
}

// yield is a removal's request (from host by) for the host's reference to
// id: released now, in the background, if no local holder has the
// package; otherwise the removal is told how many hold it.
func (h *hostRefs) yield(id, by string) {
	h.mu.Lock()
	p := h.pkgs[id]
	if h.closed || p == nil || !p.etcd || p.busy != nil {
		h.mu.Unlock()
		return
	}
	if p.holders > 0 {
		// Refuse out loud: the holder count in the reference tells the
		// removal at once that jobs here hold it, instead of letting it
		// wait out its yield wait.
		h.mu.Unlock()
		h.census(id)
		return
	}
	h.stopLinger(p) // the linger release must not happen as well
	p.busy = make(chan struct{})
	h.wg.Add(1)
	h.mu.Unlock()
	go func() {
		defer h.wg.Done()
		h.log.Info("agent: releasing the host's idle reference for a removal", "id", id, "by", by)
		if err := h.release(id, p); err != nil {
			h.log.Warn("agent: release of the host's reference failed (the store retries in the background)", "id", id, "err", err)
		}
	}()
}

// census answers another host's AskHolders: the number of local holders
// of id goes into the host's etcd reference, if it holds one.
func (h *hostRefs) census(id string) {
	h.mu.Lock()
	p := h.pkgs[id]
	if h.closed || p == nil || !p.etcd {
		h.mu.Unlock()
		return
	}
	n := p.holders
	h.wg.Add(1)
	h.mu.Unlock()
	go func() {
		defer h.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 2*h.opTimeout)
		defer cancel()
		if err := h.store.RecordHolders(ctx, id, n); err != nil {
			h.log.Warn("agent: recording the holder count failed", "id", id, "err", err)
		}
	}()
}

// release drops the host's etcd reference; the caller owns p.busy.
func (h *hostRefs) release(id string, p *hostRef) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*h.opTimeout)
	err := h.store.Release(ctx, id)
	cancel()
	h.mu.Lock()
	// Even on error the store has let the reference go (it deletes the key
	// in the background, or it dies with the lease).
	p.etcd = false
	h.settle(id, p)
	h.mu.Unlock()
	return err
}

// remove removes id unless a local holder has it: a lingering host
// reference with no local holder is released first, so removal through
// the node sees only real references.
func (h *hostRefs) remove(ctx context.Context, id string) (bool, error) {
	if err := core.ValidateID(id); err != nil {
		return false, fmt.Errorf("remove %q: %w", id, err)
	}
	h.mu.Lock()
	if p := h.pkgs[id]; p != nil && (p.holders > 0 || p.taking) {
		// Held, or a Take is on its way (perhaps waiting for a build):
		// in use, and removal does not wait.
		h.mu.Unlock()
		return false, nil
	}
	h.mu.Unlock()
	p, err := h.acquire(ctx, id)
	if err != nil {
		return false, fmt.Errorf("remove %q: %w", id, err)
	}
	if p.holders > 0 {
		h.settle(id, p)
		h.mu.Unlock()
		return false, nil
	}
	h.stopLinger(p)
	held := p.etcd
	h.mu.Unlock()
	if held {
		dctx, cancel := context.WithTimeout(ctx, 2*h.opTimeout)
		derr := h.store.Release(dctx, id)
		cancel()
		if derr != nil {
			h.log.Warn("agent: release before removal failed", "id", id, "err", derr)
		}
		h.mu.Lock()
		p.etcd = false
		h.mu.Unlock()
	}
	ok, err := h.store.Remove(ctx, id)
	h.mu.Lock()
	h.settle(id, p)
	h.mu.Unlock()
	return ok, err
}

// refLost handles the store's EventRefLost: the host's etcd reference to
// id is gone with the package. The host forgets it (the next local take
// asks etcd again), and the local holders are told, in the background.
func (h *hostRefs) refLost(id string, cause error) {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return
	}
	h.wg.Add(1)
	h.mu.Unlock()
	go func() {
		defer h.wg.Done()
		p, err := h.acquire(context.Background(), id)
		if err != nil {
			return
		}
		held := p.etcd
		h.mu.Unlock()
		if held {
			// A lost reference: the store forgets it without an etcd call.
			h.store.Release(context.Background(), id) //nolint:errcheck
		}
		h.mu.Lock()
		p.etcd = false
		h.stopLinger(p)
		h.settle(id, p)
		h.mu.Unlock()
		h.lost(id, cause)
	}()
}

// close stops the linger timers and waits for the background work; the
// store's Close, which follows, revokes the lease with every etcd
// reference on it. Grants fail afterwards.
func (h *hostRefs) close() {
	h.mu.Lock()
	h.closed = true
	for _, p := range h.pkgs {
		if p.timer != nil {
			p.timer.Stop()
			p.timer = nil
		}
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// state returns the holders and whether the host holds id's etcd
// reference, for tests and inspection.
func (h *hostRefs) state(id string) (holders int, etcd bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if p := h.pkgs[id]; p != nil {
		return p.holders, p.etcd
	}
	return 0, false
}
