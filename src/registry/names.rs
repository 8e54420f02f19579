//! Names in any script, and the search key that finds them.
//!
//! Officers type names as they hear or read them: in Latin, Cyrillic or
//! Georgian script, with or without accents, `Öztürk` or `OZTURK`. The
//! register stores each name's Georgian rendering ([`to_georgian`]) and
//! searches by [`surname_key`], which folds away what transliteration
//! confuses, so all spellings of a name meet. Stored keys depend on these
//! tables: changing them means re-keying the register
//! (`super::refresh_search_keys`).

/// Folds one lower-case character to plain ASCII letters (accents, Turkish dotless i, Cyrillic);
/// Georgian letters pass through; letters of other scripts go to [`fold_other`]; anything else
/// (marks, punctuation, symbols) folds to nothing.
fn fold_char(c: char, out: &mut String) {
    let s: &str = match c {
        'a'..='z' | '0'..='9' => {
            out.push(c);
            return;
        }
        '\u{10D0}'..='\u{10FF}' => {
            out.push(c);
            return;
        }
        ' ' | '-' | '\'' | '’' | '.' => {
            out.push(' ');
            return;
        }
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' | 'ə' => "a",
        'ç' | 'ć' | 'č' | 'ĉ' | 'ċ' => "c",
        'ď' | 'đ' | 'ð' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' | 'ĕ' => "e",
        'ğ' | 'ĝ' | 'ġ' | 'ģ' => "g",
        'ĥ' | 'ħ' => "h",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' | 'ĩ' => "i",
        'ĵ' => "j",
        'ķ' => "k",
        'ĺ' | 'ļ' | 'ľ' | 'ł' | 'ŀ' => "l",
        'ñ' | 'ń' | 'ņ' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' | 'ŏ' => "o",
        'ŕ' | 'ř' | 'ŗ' => "r",
        'ś' | 'š' | 'ş' | 'ŝ' | 'ș' => "s",
        'ť' | 'ţ' | 'ț' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ų' | 'ũ' | 'ŭ' => "u",
        'ŵ' => "w",
        'ý' | 'ÿ' | 'ŷ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        'ß' => "ss",
        'æ' => "ae",
        'œ' => "oe",
        'þ' => "th",
        // Cyrillic, so an officer may type a Russian or Ukrainian name as printed at home.
        'а' => "a",
        'б' => "b",
        'в' => "v",
        'г' | 'ґ' => "g",
        'д' => "d",
        'е' | 'ё' | 'э' => "e",
        'є' => "ye",
        'ж' => "zh",
        'з' => "z",
        'и' | 'й' | 'і' => "i",
        'ї' => "yi",
        'к' => "k",
        'л' => "l",
        'м' => "m",
        'н' => "n",
        'о' => "o",
        'п' => "p",
        'р' => "r",
        'с' => "s",
        'т' => "t",
        'у' | 'ў' => "u",
        'ф' => "f",
        'х' => "kh",
        'ц' => "ts",
        'ч' => "ch",
        'ш' => "sh",
        'щ' => "shch",
        'ы' => "y",
        'ю' => "yu",
        'я' => "ya",
        _ => {
            fold_other(c, out);
            return;
        }
    };
    out.push_str(s);
}

/// A letter of a script the tables above do not cover (Arabic, Chinese, Greek, Armenian,
/// Hebrew, Devanagari, …): its Latin transliteration by `any_ascii`, lower-cased, as a word of
/// its own (so no Georgian digraph spans two source letters, and a Chinese name's syllables
/// fold as if typed apart); a letter without one is kept as it is, so a name in any script
/// has a search key. Not a letter (marks, symbols, emoji): nothing.
///
/// The tables above stay as they are: stored search keys of names they cover do not change.
fn fold_other(c: char, out: &mut String) {
    if !c.is_alphabetic() {
        return;
    }
    let start = out.len();
    out.extend(
        any_ascii::any_ascii_char(c)
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|l| l.to_ascii_lowercase()),
    );
    if out.len() == start {
        out.push(c);
    }
    out.push(' ');
}

/// Latin (lower-case ASCII) to Georgian, after the national transliteration table read backwards.
fn latin_to_georgian(word: &str, out: &mut String) {
    let b = word.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let pair = if i + 1 < b.len() {
            match (b[i], b[i + 1]) {
                (b'z', b'h') => Some('ჟ'),
                (b'g', b'h') => Some('ღ'),
                (b's', b'h') => Some('შ'),
                (b'c', b'h') => Some('ჩ'),
                (b't', b's') => Some('ც'),
                (b'd', b'z') => Some('ძ'),
                (b'k', b'h') => Some('ხ'),
                _ => None,
            }
        } else {
            None
        };
        if let Some(g) = pair {
            out.push(g);
            i += 2;
            continue;
        }
        match b[i] {
            b'a' => out.push('ა'),
            b'b' => out.push('ბ'),
            b'c' | b'k' => out.push('კ'),
            b'd' => out.push('დ'),
            b'e' => out.push('ე'),
            b'f' => out.push('ფ'),
            b'g' => out.push('გ'),
            b'h' => out.push('ჰ'),
            b'i' | b'y' => out.push('ი'),
            b'j' => out.push('ჯ'),
            b'l' => out.push('ლ'),
            b'm' => out.push('მ'),
            b'n' => out.push('ნ'),
            b'o' => out.push('ო'),
            b'p' => out.push('პ'),
            b'q' => out.push('ქ'),
            b'r' => out.push('რ'),
            b's' => out.push('ს'),
            b't' => out.push('ტ'),
            b'u' => out.push('უ'),
            b'v' | b'w' => out.push('ვ'),
            b'x' => out.push_str("ქს"),
            b'z' => out.push('ზ'),
            _ => {}
        }
        i += 1;
    }
}

/// Georgian-script rendering of a name in Latin (or Cyrillic) script; Georgian input passes through.
/// Word breaks (spaces, hyphens) are kept, so digraphs never span two words.
pub fn to_georgian(name: &str) -> String {
    let mut folded = String::with_capacity(name.len());
    for c in name.chars().flat_map(char::to_lowercase) {
        fold_char(c, &mut folded);
    }
    let mut out = String::with_capacity(folded.len() * 3);
    for (i, word) in folded.split(' ').filter(|w| !w.is_empty()).enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let mut ascii = String::new();
        for c in word.chars() {
            if c.is_ascii() {
                ascii.push(c);
            } else {
                latin_to_georgian(&ascii, &mut out);
                ascii.clear();
                out.push(c);
            }
        }
        latin_to_georgian(&ascii, &mut out);
    }
    out
}

/// The search key for a surname in any script: its Georgian rendering without word breaks,
/// with the letter pairs transliteration confuses (ტ/თ, კ/ქ/ყ, პ/ფ, წ/ც, ჭ/ჩ) merged and
/// doubled letters collapsed, so `Öztürk`, `OZTURK`, `ozturk` and `ოზტურკ` share one key.
pub fn surname_key(name: &str) -> String {
    let mut key = String::new();
    let mut prev = None;
    for c in to_georgian(name).chars() {
        let c = match c {
            ' ' => continue,
            'ტ' => 'თ',
            'კ' | 'ყ' => 'ქ',
            'პ' => 'ფ',
            'წ' => 'ც',
            'ჭ' => 'ჩ',
            other => other,
        };
        if prev != Some(c) {
            key.push(c);
        }
        prev = Some(c);
    }
    key
}
