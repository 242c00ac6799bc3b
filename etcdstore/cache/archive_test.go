package cache_test

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// makeTree writes a small package: nested directories, an executable, an
// empty file, in-tree symlinks (one dangling), and read-only modes, as a
// published package has.
func makeTree(t testing.TB, dir string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	must(os.MkdirAll(filepath.Join(dir, "lib", "deep", "er"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "bin", "tool"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "lib", "empty"), nil, 0o644))
	big := make([]byte, 300<<10)
	rand.Read(big)
	must(os.WriteFile(filepath.Join(dir, "lib", "deep", "er", "blob"), big, 0o444))
	must(os.Symlink("../lib/deep/er/blob", filepath.Join(dir, "bin", "blob")))
	must(os.Symlink("lib", filepath.Join(dir, "libs")))
	must(os.Symlink("missing", filepath.Join(dir, "dangling")))
}

func digest(t testing.TB, dir string) string {
	t.Helper()
	d, _, err := etcdstore.TreeDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestPackUnpackRoundTrip(t *testing.T) {
	src := t.TempDir()
	makeTree(t, src)
	var buf bytes.Buffer
	st, err := cache.Pack(&buf, src)
	if err != nil {
		t.Fatalf("Pack: %v", err)
	}
	_, size, _ := etcdstore.TreeDigest(src)
	if st.Bytes != size || st.Entries != 10 {
		t.Errorf("Pack stats = %+v, want %d bytes in 10 entries", st, size)
	}
	dst := t.TempDir()
	if _, err := cache.Unpack(&buf, dst, cache.DefaultLimits()); err != nil {
		t.Fatalf("Unpack: %v", err)
	}
	if got, want := digest(t, dst), digest(t, src); got != want {
		t.Errorf("digest after round trip = %s, want %s", got, want)
	}
	fi, err := os.Stat(filepath.Join(dst, "bin", "tool"))
	if err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("bin/tool mode = %v (%v), want 0755", fi.Mode(), err)
	}
	if target, err := os.Readlink(filepath.Join(dst, "libs")); err != nil || target != "lib" {
		t.Errorf("libs -> %q (%v), want lib", target, err)
	}
}

func TestPackRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(dir string) error
	}{
		{"absolute symlink", func(dir string) error { return os.Symlink("/etc/passwd", filepath.Join(dir, "l")) }},
		{"symlink out", func(dir string) error { return os.Symlink("../x", filepath.Join(dir, "l")) }},
		{"fifo", func(dir string) error { return syscall.Mkfifo(filepath.Join(dir, "p"), 0o644) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := tc.make(dir); err != nil {
				t.Fatal(err)
			}
			if _, err := cache.Pack(new(bytes.Buffer), dir); err == nil {
				t.Errorf("Pack of a tree with a %s succeeded, want an error", tc.name)
			}
		})
	}
}

// entry is one header of a hand-made (hostile) archive.
type entry struct {
	typ      byte
	name     string
	body     string
	linkname string
	size     int64 // header size if not len(body)
}

func rawArchive(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		size := int64(len(e.body))
		if e.size != 0 {
			size = e.size
		}
		if e.typ != tar.TypeReg {
			size = 0
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: e.typ, Name: e.name, Linkname: e.linkname, Size: size, Mode: 0o755, Devmajor: 1, Devminor: 3}); err != nil {
			t.Fatal(err)
		}
		if e.body != "" {
			tw.Write([]byte(e.body)) //nolint:errcheck // short bodies are the point of some cases
		}
	}
	tw.Flush()
	zw.Close()
	return buf.Bytes()
}

func TestUnpackRejectsHostileArchives(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries []entry
		lim     func(*cache.Limits)
	}{
		{"dot-dot", []entry{{typ: tar.TypeReg, name: "../x", body: "evil"}}, nil},
		{"dot-dot inside", []entry{{typ: tar.TypeDir, name: "a/"}, {typ: tar.TypeReg, name: "a/../../x", body: "evil"}}, nil},
		{"absolute", []entry{{typ: tar.TypeReg, name: "/tmp/granary-evil", body: "evil"}}, nil},
		{"dot prefix", []entry{{typ: tar.TypeReg, name: "./x", body: "x"}}, nil},
		{"symlink to /etc then file through it", []entry{
			{typ: tar.TypeSymlink, name: "etc", linkname: "/etc"},
			{typ: tar.TypeReg, name: "etc/granary-evil", body: "evil"},
		}, nil},
		{"symlink to outside dir then file through it", []entry{
			{typ: tar.TypeSymlink, name: "out", linkname: "../outside"},
			{typ: tar.TypeReg, name: "out/x", body: "evil"},
		}, nil},
		{"file through an in-tree symlink", []entry{
			{typ: tar.TypeDir, name: "d/"},
			{typ: tar.TypeSymlink, name: "l", linkname: "d"},
			{typ: tar.TypeReg, name: "l/x", body: "x"},
		}, nil},
		{"symlink out through another symlink", []entry{
			{typ: tar.TypeDir, name: "d/"},
			{typ: tar.TypeSymlink, name: "d/s", linkname: ".."},
			{typ: tar.TypeSymlink, name: "d/t", linkname: "s/../.."},
		}, nil},
		{"hard link out", []entry{{typ: tar.TypeLink, name: "h", linkname: "/etc/passwd"}}, nil},
		{"hard link in", []entry{{typ: tar.TypeReg, name: "a", body: "a"}, {typ: tar.TypeLink, name: "h", linkname: "a"}}, nil},
		{"char device", []entry{{typ: tar.TypeChar, name: "null"}}, nil},
		{"fifo", []entry{{typ: tar.TypeFifo, name: "p"}}, nil},
		{"duplicate file", []entry{{typ: tar.TypeReg, name: "a", body: "1"}, {typ: tar.TypeReg, name: "a", body: "2"}}, nil},
		{"file then dir of the same name", []entry{{typ: tar.TypeReg, name: "a", body: "1"}, {typ: tar.TypeDir, name: "a/"}}, nil},
		{"child before its parent", []entry{{typ: tar.TypeReg, name: "a/b", body: "1"}}, nil},
		{"too many bytes", []entry{{typ: tar.TypeReg, name: "a", body: "0123456789"}, {typ: tar.TypeReg, name: "b", body: "0123456789"}},
			func(l *cache.Limits) { l.MaxBytes = 15 }},
		{"too many entries", []entry{{typ: tar.TypeDir, name: "a/"}, {typ: tar.TypeDir, name: "b/"}, {typ: tar.TypeDir, name: "c/"}},
			func(l *cache.Limits) { l.MaxEntries = 2 }},
		{"size larger than the data", []entry{{typ: tar.TypeReg, name: "a", body: "short", size: 1 << 20}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			dst := filepath.Join(base, "contents")
			outside := filepath.Join(base, "outside")
			for _, d := range []string{dst, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			lim := cache.DefaultLimits()
			if tc.lim != nil {
				tc.lim(&lim)
			}
			_, err := cache.Unpack(bytes.NewReader(rawArchive(t, tc.entries...)), dst, lim)
			if err == nil {
				t.Fatalf("Unpack succeeded, want an error")
			}
			t.Logf("Unpack: %v", err)
			// Nothing outside the target: base holds only the two dirs,
			// outside stays empty, and nothing appeared in /etc or /tmp.
			if ents, _ := os.ReadDir(base); len(ents) != 2 {
				t.Errorf("%s holds %d entries, want 2", base, len(ents))
			}
			if ents, _ := os.ReadDir(outside); len(ents) != 0 {
				t.Errorf("%s was written: %v", outside, ents)
			}
			for _, p := range []string{"/etc/granary-evil", "/tmp/granary-evil", filepath.Join(base, "x")} {
				if _, err := os.Lstat(p); err == nil {
					os.Remove(p)
					t.Errorf("%s was written", p)
				}
			}
		})
	}
}

func TestUnpackRejectsNonEmptyDirAndGarbage(t *testing.T) {
	src := t.TempDir()
	makeTree(t, src)
	var buf bytes.Buffer
	if _, err := cache.Pack(&buf, src); err != nil {
		t.Fatal(err)
	}
	if _, err := cache.Unpack(bytes.NewReader(buf.Bytes()), src, cache.DefaultLimits()); err == nil {
		t.Error("Unpack into a non-empty directory succeeded")
	}
	if _, err := cache.Unpack(bytes.NewReader([]byte("not zstd at all")), t.TempDir(), cache.DefaultLimits()); err == nil {
		t.Error("Unpack of garbage succeeded")
	}
	flipped := bytes.Clone(buf.Bytes())
	flipped[len(flipped)/2] ^= 0xff
	if _, err := cache.Unpack(bytes.NewReader(flipped), t.TempDir(), cache.DefaultLimits()); err == nil {
		t.Error("Unpack of a damaged archive succeeded")
	}
	small := cache.DefaultLimits()
	small.MaxWindow = zstd.MinWindowSize
	_, err := cache.Unpack(bytes.NewReader(buf.Bytes()), t.TempDir(), small)
	if !errors.Is(err, cache.ErrUnsafeArchive) || !errors.Is(err, zstd.ErrWindowSizeExceeded) {
		t.Errorf("Unpack with a 1 KiB window limit: %v, want an unsafe archive for its zstd window", err)
	}
}

// TestUnpackRefusesDeepAndWideWindows: very deep paths (cheap to send,
// quadratic to unpack) and a zstd window above the limit are unsafe
// archives, refused before they cost much.
func TestUnpackRefusesDeepAndWideWindows(t *testing.T) {
	var deep bytes.Buffer
	zw, _ := zstd.NewWriter(&deep)
	tw := tar.NewWriter(zw)
	name := ""
	for range cache.MaxDepth + 2 {
		name += "a/"
		tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: 0o755, Format: tar.FormatPAX})
	}
	tw.Close()
	zw.Close()
	if _, err := cache.Unpack(&deep, t.TempDir(), cache.DefaultLimits()); !errors.Is(err, cache.ErrUnsafeArchive) {
		t.Errorf("%d nested directories: %v; want cache.ErrUnsafeArchive", cache.MaxDepth+2, err)
	}

	var raw bytes.Buffer
	tw = tar.NewWriter(&raw)
	body := bytes.Repeat([]byte("x"), 1<<20)
	tw.WriteHeader(&tar.Header{Name: "a", Typeflag: tar.TypeReg, Size: int64(len(body)), Mode: 0o644})
	tw.Write(body)
	tw.Close()
	var wide bytes.Buffer
	zw, _ = zstd.NewWriter(&wide, zstd.WithWindowSize(128<<20))
	zw.Write(raw.Bytes())
	zw.Close()
	if _, err := cache.Unpack(&wide, t.TempDir(), cache.DefaultLimits()); !errors.Is(err, cache.ErrUnsafeArchive) {
		t.Errorf("128 MiB window: %v; want cache.ErrUnsafeArchive", err)
	}
}

// TestPackRefusesWhatUnpackRefuses: a symlink loop and an escape through
// another symlink are refused when packing, so no archive is uploaded that
// every fetch would refuse.
func TestPackRefusesWhatUnpackRefuses(t *testing.T) {
	loop := t.TempDir()
	os.Symlink("b", filepath.Join(loop, "a"))
	os.Symlink("a", filepath.Join(loop, "b"))
	chained := t.TempDir()
	os.Mkdir(filepath.Join(chained, "d"), 0o755)
	os.Symlink("..", filepath.Join(chained, "d", "s"))
	os.Symlink("d/s/..", filepath.Join(chained, "t"))
	dangling := t.TempDir()
	os.Symlink("missing", filepath.Join(dangling, "l"))
	for name, dir := range map[string]string{"loop": loop, "chained escape": chained} {
		var buf bytes.Buffer
		if _, err := cache.Pack(&buf, dir); err == nil {
			t.Errorf("%s: Pack succeeded", name)
		}
	}
	var buf bytes.Buffer
	if _, err := cache.Pack(&buf, dangling); err != nil {
		t.Errorf("dangling link inside: Pack = %v", err)
	} else if _, err := cache.Unpack(&buf, t.TempDir(), cache.DefaultLimits()); err != nil {
		t.Errorf("dangling link inside: Unpack = %v", err)
	}
}
