package etcdstore

import (
	"context"
	"fmt"
	"time"

	"github.com/granary-build/granary/core"
)

// Why is what keeps one package from removal right now.
type Why struct {
	ID    string `json:"id"`
	State State  `json:"state"`
	// Refs are the references on it: jobs (plain) and nodes (cached, with
	// their local holder count when the node answered).
	Refs []RefInfo  `json:"refs"`
	Pin  *PinRecord `json:"pin,omitempty"`
	// NeededBy are the published packages that need it, each with what
	// keeps it (a dependent that nothing keeps goes before it in a gc).
	NeededBy []*Why `json:"needed_by,omitempty"`
	// Build is an attempt in progress (it holds the lock).
	Build *BuildRecord `json:"build,omitempty"`
	// GraceUntil is when the gc grace period (DefaultPruneGrace from the
	// last use) ends, if it has not; rm ignores it.
	GraceUntil time.Time `json:"grace_until,omitzero"`
	// Invalid is an invalidation in force: no new reference, removed when
	// what keeps it is gone.
	Invalid *InvalidRecord `json:"invalid,omitempty"`
	// Alive: something above keeps it from rm (references, pin, a
	// dependent, a build). The grace period keeps it only from gc.
	Alive bool `json:"alive"`
	// Seen: a dependent already explained higher up (the graph is a DAG,
	// so one package can be reached twice); its fields are left empty.
	Seen bool `json:"seen,omitempty"`
}

// Why explains what keeps id from removal: its references (asking the
// nodes with cached references for their holder counts, for at most wait),
// its pin, the packages that need it and, recursively, what keeps them, a
// build in progress and the gc grace period.
func (s *Store) Why(ctx context.Context, id string, wait time.Duration) (*Why, error) {
	if err := core.ValidateID(id); err != nil {
		return nil, fmt.Errorf("why: %w", err)
	}
	return s.why(ctx, id, wait, map[string]bool{})
}

func (s *Store) why(ctx context.Context, id string, wait time.Duration, seen map[string]bool) (*Why, error) {
	if seen[id] {
		return &Why{ID: id, Seen: true}, nil
	}
	seen[id] = true
	info, err := s.AskHolders(ctx, id, wait)
	if err != nil {
		return nil, err
	}
	w := &Why{ID: id, State: info.State, Refs: info.Refs, Pin: info.Pin, Invalid: info.Invalid}
	if w.Pin != nil && w.Pin.Expired(time.Now()) {
		w.Pin = nil // removal deletes it
	}
	if info.Build != nil && info.Build.State == BuildRunning {
		w.Build = info.Build
	}
	if info.Package != nil {
		last := info.Package.BuiltAt
		if info.ATime.After(last) {
			last = info.ATime
		}
		if until := last.Add(DefaultPruneGrace); time.Now().Before(until) {
			w.GraceUntil = until
		}
	}
	for _, d := range info.NeededBy {
		dw, err := s.why(ctx, d, wait, seen)
		if err != nil {
			return nil, err
		}
		w.NeededBy = append(w.NeededBy, dw)
	}
	w.Alive = len(w.Refs) > 0 || w.Pin != nil || len(w.NeededBy) > 0 || w.Build != nil
	return w, nil
}
