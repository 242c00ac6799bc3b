package cache

import (
	"errors"
	"fmt"
)

// The cache's sentinel errors (test with errors.Is) and its error type
// (errors.As). Messages read as core/errors.go says: no package prefix;
// Fetch, Store, Contains and Verify name their operation, the package and
// the cache once ("fetch \"py312\" from cache https://…: …").

// ErrNotCached is returned by Verify for an entry the cache does not have.
var ErrNotCached = errors.New("no such entry")

// ErrFetchBudget is matched (errors.Is) by the error of a Fetch that ran
// out of its budget (WithFetchBudget).
var ErrFetchBudget = errors.New("fetch budget spent")

// ErrUnsafeArchive is wrapped by Unpack's error when an archive breaks a
// safety rule (path outside the tree, link out of it, unsupported entry
// type, duplicate, over a limit).
var ErrUnsafeArchive = errors.New("unsafe archive")

// ErrBadKey is returned for a key that cannot be parsed.
var ErrBadKey = errors.New("bad key")

// ErrRejected is matched (errors.Is) by the error of a Fetch that refused
// an entry; errors.As with *RejectedError gives the reason.
var ErrRejected = errors.New("entry rejected")

// RejectedError is a Fetch error for an entry that failed the signature
// checks. Nothing of it was unpacked, except for ReasonDigestMismatch,
// whose tree Build clears.
type RejectedError struct {
	ID     string
	Reason Reason
	Detail string
}

func (e *RejectedError) Error() string {
	s := fmt.Sprintf("entry rejected: %s", e.Reason)
	if e.Detail != "" {
		s += " (" + e.Detail + ")"
	}
	return s
}

// Is makes errors.Is(err, ErrRejected) true.
func (e *RejectedError) Is(target error) bool { return target == ErrRejected }
