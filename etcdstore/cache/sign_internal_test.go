package cache

import "testing"

// BenchmarkSignIndex and BenchmarkVerifyIndex: the ed25519 cost per entry.
func BenchmarkSignIndex(b *testing.B) {
	k, err := GenerateKey("bench-1", nil)
	if err != nil {
		b.Fatal(err)
	}
	idx := &Index{ID: "pkg", Format: FormatVersion, Digest: "sha256:00", Size: 1, ArchiveSize: 1, ArchiveHash: "sha256:00"}
	for b.Loop() {
		idx.Signatures = nil
		idx.sign(k)
	}
}

func BenchmarkVerifyIndex(b *testing.B) {
	k, err := GenerateKey("bench-1", nil)
	if err != nil {
		b.Fatal(err)
	}
	idx := &Index{ID: "pkg", Format: FormatVersion, Digest: "sha256:00", Size: 1, ArchiveSize: 1, ArchiveHash: "sha256:00"}
	idx.sign(k)
	trusted := []PublicKey{k.Public()}
	for b.Loop() {
		if r := idx.verify(trusted); r != "" {
			b.Fatal(r)
		}
	}
}
