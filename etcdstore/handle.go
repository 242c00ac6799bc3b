package etcdstore

import "fmt"

// Handle is one package of a Store. It holds no state of its own: references
// are counted by the Store per package ID, so two Handles of one ID are
// interchangeable.
type Handle struct {
	s   *Store
	id  string
	err error // from core.ValidateID
}

// ID returns the package ID.
func (h *Handle) ID() string { return h.id }

// OutputDirectory returns <root>/pkgs/<id>/contents, or "" for an invalid ID.
func (h *Handle) OutputDirectory() string {
	if h.err != nil {
		return ""
	}
	return h.s.outputDir(h.id)
}

// LoggingDirectory returns <root>/pkgs/<id>/logs, or "" for an invalid ID.
func (h *Handle) LoggingDirectory() string {
	if h.err != nil {
		return ""
	}
	return h.s.logDir(h.id)
}

func (h *Handle) fail(op string, err error) error {
	return fmt.Errorf("%s %q: %w", op, h.id, err)
}
