package agent

import (
	"errors"
	"fmt"
	"io"
	"testing"
)

// A connection's end reads as fmt.Errorf("%w: %v", ErrNodeGone, why)
// would, and wraps ErrNodeGone only.
func TestNodeGoneReadsAsFmt(t *testing.T) {
	for _, why := range []error{errors.New("closed"), io.ErrUnexpectedEOF} {
		got, want := nodeGone(why.Error()), fmt.Errorf("%w: %v", ErrNodeGone, why)
		if got.Error() != want.Error() {
			t.Errorf("nodeGone(%q) = %q, want %q", why, got, want)
		}
		if !errors.Is(got, ErrNodeGone) || errors.Is(got, why) {
			t.Errorf("nodeGone(%q) wraps %v; want ErrNodeGone and not the reason", why, errors.Unwrap(got))
		}
	}
}
