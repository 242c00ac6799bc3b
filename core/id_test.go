package core

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		name string
		id   string
		ok   bool
	}{
		{"simple", "cpython-3.12.7-4f1c2a", true},
		{"all classes", "a-Z_0.9+x=y@z", true},
		{"max length", strings.Repeat("a", MaxIDLen), true},
		{"dot inside", "a..b", true},
		{"empty", "", false},
		{"too long", strings.Repeat("a", MaxIDLen+1), false},
		{"dot", ".", false},
		{"dotdot", "..", false},
		{"leading dot", ".hidden", false},
		{"leading dash", "-rf", false},
		{"dash inside", "a-", true},
		{"slash", "a/b", false},
		{"traversal", "../etc", false},
		{"backslash", `a\b`, false},
		{"nul", "a\x00b", false},
		{"newline", "a\nb", false},
		{"del", "a\x7fb", false},
		{"space", "a b", false},
		{"non-ascii", "paquet-é", false},
		{"colon", "a:b", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateID(tt.id)
			if tt.ok && err != nil {
				t.Fatalf("ValidateID(%q) = %v, want nil", tt.id, err)
			}
			if !tt.ok {
				if err == nil {
					t.Fatalf("ValidateID(%q) = nil, want error", tt.id)
				}
				if !errors.Is(err, ErrInvalidID) {
					t.Fatalf("ValidateID(%q) = %v, want errors.Is ErrInvalidID", tt.id, err)
				}
			}
		})
	}
}

// FuzzValidateID checks that every accepted ID is a single, harmless path
// element: joining it under a root stays directly under that root.
func FuzzValidateID(f *testing.F) {
	for _, s := range []string{"pkg", "..", ".", "a/b", "a\x00", "-x", "x@1.2+3=4", strings.Repeat("z", 201)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ValidateID(id) != nil {
			return
		}
		root := "/granary/pkgs"
		p := filepath.Join(root, id)
		if filepath.Dir(p) != root || filepath.Base(p) != id {
			t.Fatalf("accepted id %q escapes or is rewritten: %q", id, p)
		}
		if len(id) == 0 || len(id) > MaxIDLen || id[0] == '.' || id[0] == '-' {
			t.Fatalf("accepted id %q breaks the length, dot or dash rule", id)
		}
		for i := 0; i < len(id); i++ {
			if id[i] < 0x21 || id[i] > 0x7e || id[i] == '/' || id[i] == '\\' {
				t.Fatalf("accepted id %q has byte %#x", id, id[i])
			}
		}
	})
}
