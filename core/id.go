package core

import "fmt"

// MaxIDLen is the longest package ID in bytes.
const MaxIDLen = 200

// ValidateID reports whether id can name a package. A valid ID is 1 to
// MaxIDLen bytes of ASCII letters, digits and ._+=@-, does not start with a
// dot (so it is never "." or ".." and never hides among dot-files) nor with
// a '-' (which command lines, granary's and every tool's, take for a
// flag), and so
// never contains a path separator, NUL or control byte. IDs are used as path
// elements and etcd key segments as they are; validation is what keeps a
// package inside its root. The error wraps ErrInvalidID and says why.
func ValidateID(id string) error {
	switch {
	case id == "":
		return fmt.Errorf("%w: empty", ErrInvalidID)
	case len(id) > MaxIDLen:
		return fmt.Errorf("%w: %d bytes, longer than %d", ErrInvalidID, len(id), MaxIDLen)
	case id[0] == '.':
		return fmt.Errorf("%w %q: must not start with '.'", ErrInvalidID, id)
	case id[0] == '-':
		return fmt.Errorf("%w %q: must not start with '-' (it would read as a flag)", ErrInvalidID, id)
	}
	for i := 0; i < len(id); i++ {
		if !idByte(id[i]) {
			return fmt.Errorf("%w %q: byte %#02x at offset %d is not one of [A-Za-z0-9._+=@-]", ErrInvalidID, id, id[i], i)
		}
	}
	return nil
}

func idByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	switch c {
	case '.', '_', '+', '=', '@', '-':
		return true
	}
	return false
}
