package archdoc

import (
	"bufio"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// archDoc is the map the test holds to the tree.
const archDoc = "docs/architecture.md"

var (
	// packageHeading is a package's section: "## `etcdstore/cache`".
	packageHeading = regexp.MustCompile("^## `([^`]+)`")
	// fileRow is a file's line in its package's table: "| `archive.go` | …".
	fileRow = regexp.MustCompile("^\\| `([^`/]+\\.go)` \\|")
)

// docEntry is a file named in architecture.md and the line that names it.
type docEntry struct {
	file string // relative to the repository root
	line int
}

// readArchDoc returns the files architecture.md names (under the package
// heading they follow) and the packages it has a section for.
func readArchDoc(t *testing.T, root string) (files []docEntry, pkgs map[string]int) {
	t.Helper()
	f, err := os.Open(filepath.Join(root, archDoc))
	if err != nil {
		t.Fatalf("%v (every package, its role and its files belong there)", err)
	}
	defer f.Close()
	pkgs = make(map[string]int)
	pkg := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if m := packageHeading.FindStringSubmatch(line); m != nil {
			pkg = strings.TrimSuffix(m[1], "/")
			if prev, ok := pkgs[pkg]; ok {
				t.Errorf("%s:%d: package %s has a second section (the first is at line %d)", archDoc, n, pkg, prev)
			}
			pkgs[pkg] = n
			continue
		}
		if m := fileRow.FindStringSubmatch(line); m != nil {
			if pkg == "" {
				t.Errorf("%s:%d: file %s is listed before any package heading", archDoc, n, m[1])
				continue
			}
			files = append(files, docEntry{file: path.Join(pkg, m[1]), line: n})
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return files, pkgs
}

// TestArchitectureNamesEveryFile fails when a non-test Go file is missing
// from docs/architecture.md, when the document names a file or a package
// that does not exist, or names a file twice. Its messages say what to add
// or remove, so whoever adds a file (or merges a branch that did) knows
// which line to write.
func TestArchitectureNamesEveryFile(t *testing.T) {
	root := repoRoot(t)
	named, pkgs := readArchDoc(t, root)

	inDoc := make(map[string]int, len(named))
	for _, e := range named {
		if prev, ok := inDoc[e.file]; ok {
			t.Errorf("%s:%d: %s is named twice (also at line %d)", archDoc, e.line, e.file, prev)
			continue
		}
		inDoc[e.file] = e.line
	}

	onDisk := make(map[string]bool)
	for _, f := range sourceFiles(t, root) {
		onDisk[f] = true
		if _, ok := inDoc[f]; ok {
			continue
		}
		dir := path.Dir(f)
		if _, ok := pkgs[dir]; ok {
			t.Errorf("%s is not in %s: add a row \"| `%s` | what it holds |\" to the section ## `%s`",
				f, archDoc, path.Base(f), dir)
		} else {
			t.Errorf("%s is not in %s, nor is its package: add a section ## `%s` (its role) with a row for `%s`",
				f, archDoc, dir, path.Base(f))
		}
	}

	for _, e := range named {
		if onDisk[e.file] {
			continue
		}
		if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(e.file))); err == nil {
			continue // a file the go tool ignores (testdata, a dot file) may be described too
		}
		t.Errorf("%s:%d: names %s, which does not exist: remove the row or fix the name", archDoc, e.line, e.file)
	}
	for pkg, line := range pkgs {
		if fi, err := os.Stat(filepath.Join(root, filepath.FromSlash(pkg))); err != nil || !fi.IsDir() {
			t.Errorf("%s:%d: has a section for package %s, which does not exist", archDoc, line, pkg)
		}
	}
}
