package etcdstore

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// WaitBuildEnd blocks while package id is being built and returns its
// state once it is not: StateAvailable when it was published,
// StateFailed when the attempt failed (its record turned to failed, or its
// builder's record vanished and a failure record names it), StateAbsent
// when the attempt ended without either (its builder died or gave up). It
// returns at once when no attempt is running. It waits with watches from
// the revision of its first read, so no change is missed between the two.
func (s *Store) WaitBuildEnd(ctx context.Context, id string) (State, error) {
	if err := core.ValidateID(id); err != nil {
		return "", fmt.Errorf("wait for build: %w", err)
	}
	for {
		st, err := s.readState(ctx, id)
		if err != nil {
			return "", fmt.Errorf("wait for build of %q: %w", id, err)
		}
		if state, done := s.settled(ctx, id, st); done {
			return state, nil
		}
		ended, err := s.watchBuildEnd(ctx, id, st.rev)
		if err != nil {
			return "", fmt.Errorf("wait for build of %q: %w", id, err)
		}
		if !ended {
			continue // the watch was cut (compaction, no leader): read again
		}
	}
}

// settled says what a state read means for WaitBuildEnd.
func (s *Store) settled(ctx context.Context, id string, st state) (State, bool) {
	switch {
	case st.avail != nil:
		return StateAvailable, true
	case st.build != nil && st.build.State == BuildFailed:
		return StateFailed, true
	case st.build != nil:
		return "", false
	}
	if fr, _, err := s.lastFailure(ctx, id); err == nil && fr != nil {
		return StateFailed, true
	}
	return StateAbsent, true
}

// watchBuildEnd watches avail and build of id after rev until one changes
// (the one wait for an attempt to end: WaitBuildEnd's and IncRef's). It
// reports false when the watch ended without an event, with ctx's error,
// ErrClosed if the store closed, or nil (the caller reads again).
func (s *Store) watchBuildEnd(ctx context.Context, id string, rev int64) (bool, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)() // Close ends the wait
	// One watch over the package's keys of both kinds is not possible (they
	// share no prefix); two watches from the same revision see every change.
	availCh := s.cli.Watch(wctx, s.keys.AvailKey(id), clientv3.WithRev(rev+1))
	buildCh := s.cli.Watch(wctx, s.keys.BuildKey(id), clientv3.WithRev(rev+1))
	for {
		var wr clientv3.WatchResponse
		var ok bool
		select {
		case wr, ok = <-availCh:
		case wr, ok = <-buildCh:
		case <-wctx.Done():
			return false, wctxErr(ctx, wctx)
		}
		if !ok || wr.Err() != nil {
			if err := wctxErr(ctx, wctx); err != nil {
				return false, err
			}
			if wr.Err() != nil && !errors.Is(wr.Err(), context.Canceled) {
				s.opt.logger.Debug("watch ended; reading state again", "id", id, "err", wr.Err())
			}
			return false, nil
		}
		if len(wr.Events) > 0 {
			return true, nil
		}
	}
}
